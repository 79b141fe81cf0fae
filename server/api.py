"""The wire formats the server (python -m server) speaks: OpenAI's chat and text completions and llama.cpp's /infill,
each request checked field by field into a batcher.Request (an ApiError names the field that is
wrong), and the tokens a request got turned back into the reply its client expects: content, the
thought as reasoning_content, tool calls parsed from the model's own notation, finish reasons, usage.

    import torch; from server.api import Api; from server.batcher import Batcher; from generate import load
    model, tok = load("weights-code", "cpu", torch.float32)
    api = Api(model, tok, "weights-code", Batcher(model), api_key=None, max_tokens=4096)
    reqs, how = api.completion({"prompt": "def f(x):", "max_tokens": 8, "seed": 0})
    api.batcher.generate(reqs); print(api.reply(reqs, how, api.wait(reqs))["choices"][0]["text"])
"""

import base64
import binascii
import io
import json
import queue
import secrets
import time
import uuid

from server.batcher import Batcher, Request
from checkpoint import vision_config
from editing import FILL, Canvas, parse_infill, parse_pin, parse_template
from hfconfig import CheckpointError
from images import ImageError, image_patches, image_settings, place_images, read_image
from request import check_chat, check_text_model
from sampler import RequestError, check_context
from tokenizer import ChatFormat


class ApiError(Exception):
    """A request the server refuses: the HTTP status, and an OpenAI-style error object."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.status}}


KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list", dict: "an object"}


def field(body: dict, name: str, kind, default=None, low=None, high=None, *, where: str = ""):
    """body[name] checked: its type, and low <= value <= high; ApiError 400 naming the field."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise ApiError(400, f"{where}{name} must be {KINDS[kind]}", where + name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(400, f"{where}{name} must be between {low} and {high}, not {value}", where + name)
    return value


def stops_of(body: dict) -> list[str]:
    """The request's stop strings (OpenAI's `stop`: a string or up to four)."""
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a string or a list of at most 4 non-empty strings", "stop")
    return stop


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one was found."""
    ends = [text.find(s) for s in stops if s in text]
    return (text[: min(ends)], True) if ends else (text, False)


# OpenAI's sampling fields this sampler has no use for, with their neutral values (accepted), and why
# any other value is refused: a field the model cannot honour is never silently ignored
UNSUPPORTED = {
    "top_p": (1, "a canvas is sampled from the whole distribution at a scheduled temperature: use temperature, or "
                 "diffusion.entropy_bound (lower: fewer uncertain tokens kept per step)"),
    "logprobs": (False, "a committed token is the argmax of the last of several refining steps, with no single "
                        "probability of being sampled to report"),
    "top_logprobs": (0, "a committed token is the argmax of the last of several refining steps, with no single "
                        "probability of being sampled to report"),
    "presence_penalty": (0, "every token of a canvas is decided together: there is no running count to penalise"),
    "frequency_penalty": (0, "every token of a canvas is decided together: there is no running count to penalise"),
    "logit_bias": ({}, "fix tokens with diffusion.pins, or restrict them with response_format"),
    "best_of": (1, "use n, and choose among the choices"),
}
MAX_PROMPTS = 16  # prompts in one /v1/completions request (each with n choices)


def refuse_unsupported(body: dict) -> None:
    """A 400 naming the first field of UNSUPPORTED set to anything but its neutral value (or null)."""
    for name, (neutral, why) in UNSUPPORTED.items():
        v = body.get(name)
        if v is None or (v == neutral and isinstance(v, bool) == isinstance(neutral, bool)):
            continue
        raise ApiError(400, f"{name} {json.dumps(v)[:40]} is not supported: {why}", name)


def completion_prompts(prompt, vocab_size: int) -> list:
    """OpenAI's forms of a completion prompt as a list of prompts, each a string or a list of token
    ids: a string, a list of strings, a list of token ids, or a list of lists of token ids."""
    def ids_ok(x):
        return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str) or ids_ok(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids_ok(p) for p in prompt):
        prompts = prompt
    else:
        raise ApiError(400, "prompt must be a non-empty string, a list of strings, a list of token ids, or a list "
                       "of lists of token ids", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"prompt holds {len(prompts)} prompts; at most {MAX_PROMPTS} a request", "prompt")
    for i, p in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if isinstance(p, str) and not p:
            raise ApiError(400, f"{where} is empty", "prompt")
        if not isinstance(p, str) and not all(0 <= t < vocab_size for t in p):
            raise ApiError(400, f"{where} holds a token id outside 0..{vocab_size - 1}", "prompt")
    return prompts


class Api:
    """What the endpoints share: the model, its tokenizer and defaults, the worker."""

    def __init__(self, model, tok, name: str, batcher: Batcher, api_key: str | None, max_tokens: int):
        self.model, self.tok, self.name, self.batcher = model, tok, name, batcher
        self.api_key, self.max_tokens, self.created = api_key, max_tokens, int(time.time())

    def request(self, body: dict, ids: list[int], max_tokens: int, canvas: Canvas | None = None, *,
                prompt_field: str = "prompt", events: queue.Queue | None = None, first_choice: int = 0) -> Request:
        """The worker's Request: the settings, the diffusion extension, the seed, the checks.
        prompt_field: what a prompt too long for the model is blamed on; events: a queue shared with
        the request's other prompts, whose choices start at first_choice."""
        ext = field(body, "diffusion", dict, {})
        temperature = field(body, "temperature", float, None, 0, 2)
        if temperature == 0:
            raise ApiError(400, "temperature must be greater than 0: it scales the checkpoint's temperature schedule "
                           "(1, the default, keeps it); for more certain text lower it, or diffusion.entropy_bound",
                           "temperature")
        settings = self.model.generation_settings.copy(
            max_new_tokens=max_tokens, steps=field(ext, "steps", int, None, 1, 1024, where="diffusion."),
            entropy_bound=field(ext, "entropy_bound", float, None, 1e-6, 1e6, where="diffusion."),
            temperature=temperature)
        if canvas is None and field(ext, "template", str) is not None:  # the answer is the template, filled
            canvas = parse_template(self.tok, ext["template"], field(ext, "hole", str, "_", where="diffusion."))
        pins = {}
        for offset, text in field(ext, "pins", dict, {}).items():
            if not isinstance(text, str) or not str(offset).isdigit():
                raise ApiError(400, "diffusion.pins maps new-token offsets to text, e.g. {\"40\": \"}\"}", "diffusion.pins")
            pins.update(parse_pin(self.tok, f"{offset}:{text}"))
        if canvas is not None:
            canvas.pin(pins)
            settings, pins = settings.copy(max_new_tokens=canvas.length, eos_token_ids=()), canvas.pins
        elif pins and max(pins) >= settings.max_new_tokens:
            raise ApiError(400, f"diffusion.pins: position {max(pins)} is beyond the {max_tokens} new tokens",
                           "diffusion.pins")
        try:
            check_context(self.model.config, len(ids), settings.max_new_tokens)
        except RequestError as e:
            raise ApiError(400, str(e), prompt_field) from None
        seed = field(body, "seed", int, None, -2 ** 63, 2 ** 63 - 1)
        if seed is None:  # one random seed for all of a request's prompts, chosen once
            seed = body["seed"] = secrets.randbelow(2 ** 31)
        req = Request(ids, settings, seed, field(body, "n", int, 1, 1, 16), pins or None,
                      bool(field(ext, "stream_canvas", bool, False)), field(ext, "cache_prompt", bool, True),
                      first_choice=first_choice)
        if events is not None:
            req.events = events
        return req

    def budget(self, body: dict, *names, default: int) -> int:
        for n in names:
            if body.get(n) is not None:
                return field(body, n, int, None, 0 if n == "n_predict" else 1, self.max_tokens)
        return default

    def chat(self, body: dict) -> tuple[list[Request], dict]:
        """/v1/chat/completions: the Request (in a list, as every endpoint gives them), and how to
        build its reply."""
        tools = field(body, "tools", list)
        if tools is not None and body.get("tool_choice") == "none":
            tools = None
        kwargs = field(body, "chat_template_kwargs", dict, {})
        thinking = bool(field(body, "thinking", bool, False) or kwargs.get("enable_thinking")
                        or body.get("reasoning_effort") not in (None, "none"))
        refuse_unsupported(body)
        messages, pictures = images_of(field(body, "messages", list, []))
        settings = self.image_settings() if pictures else None
        try:
            check_chat(self.tok, self.name, ChatFormat(thinking=thinking), conversation=True,
                       instead="this server's /v1/completions (a raw prompt, a suffix) and /infill take plain text")
        except RequestError as e:
            raise ApiError(400, str(e), "messages") from None
        try:
            ids = self.tok.apply_chat_template(messages, thinking=thinking, tools=tools)
        except (RequestError, CheckpointError) as e:
            raise ApiError(400, str(e), "messages") from None
        patches, ids = self.place(pictures, ids, settings) if pictures else (None, ids)
        max_tokens = self.budget(body, "max_completion_tokens", "max_tokens",
                                 default=self.model.generation_settings.max_new_tokens)
        req = self.request(body, ids, max_tokens, prompt_field="messages")
        if patches:  # the same token ids may stand for other images: never from or into the prefix cache
            if body.get("response_format") is not None:
                raise ApiError(400, "response_format does not take images yet", "response_format")
            req.images, req.cache_prompt = patches, False
        how = {"kind": "chat", "stops": stops_of(body), "thinking": thinking, "max": req.settings.max_new_tokens,
               "id": "chatcmpl-" + uuid.uuid4().hex[:24]}
        if tools and body.get("response_format") is not None:
            raise ApiError(400, "response_format does not go with tools: the schema lays out the whole answer",
                           "response_format")
        call = forced_call(tools, body.get("tool_choice"))
        if call is not None:  # a call that must be made: its arguments a typed canvas of the parameters
            schema, how["tool_call"] = call
            req.job, how["max"] = self.json_job(req, schema), float("inf")
            return [req], how
        return [req], self.with_schema(body, [req], how)

    def image_settings(self):
        """The checkpoint's image settings; a 400 when it has no vision tower."""
        path = getattr(self.model, "checkpoint_dir", None)
        try:
            vision_config(path, self.model.config)
            return image_settings(path, self.model.config)
        except CheckpointError as e:
            raise ApiError(400, str(e), "messages") from None

    def place(self, pictures: list, ids: list[int], s) -> tuple[list, list[int]]:
        """The images' patches, and ids with each image token expanded to the image's soft tokens."""
        patches = [image_patches(p, s) for p in pictures]
        try:
            return patches, place_images(ids, [p.n_soft for p in patches], s)
        except ImageError as e:
            raise ApiError(400, f"{e} (the chat template placed them)", "messages") from None

    def with_schema(self, body: dict, reqs: list[Request], how: dict) -> dict:
        """With a response_format that asks for JSON, each request becomes a job (json_job)."""
        schema = self.response_schema(body)
        if schema is not None:
            for req in reqs:
                if req.pins:
                    raise ApiError(400, "response_format does not go with a suffix or diffusion pins/template: the "
                                   "schema lays out the whole answer", "response_format")
                req.job = self.json_job(req, schema)
            how["max"] = float("inf")
        return how

    def response_schema(self, body: dict) -> dict | None:
        """The JSON Schema response_format asks for: json_schema's schema, any object for json_object,
        None for text."""
        fmt = field(body, "response_format", dict)
        kind = None if fmt is None else fmt.get("type")
        if kind in (None, "text"):
            return None
        if kind == "json_object":
            return {"type": "object"}
        if kind != "json_schema":
            raise ApiError(400, f"response_format.type must be text, json_object or json_schema, not {kind!r}",
                           "response_format.type")
        spec = field(fmt, "json_schema", dict, where="response_format.")
        schema = None if spec is None else field(spec, "schema", dict, where="response_format.json_schema.")
        if schema is None:
            raise ApiError(400, "response_format.json_schema.schema must be a JSON Schema object",
                           "response_format.json_schema.schema")
        return schema

    def json_job(self, req: Request, schema: dict):
        """The batcher's job for a JSON Schema: req.n values, each editing.fill_json's (checked now:
        an unsupported keyword, or a canvas longer than the context, is a 400)."""
        from editing import fill_json
        from structured import SchemaError, build, check_schema, token_sets
        try:
            check_schema(schema)
            c = self.model.config
            room = c.max_position_embeddings - len(req.prompt) - c.canvas_length
            length = len(build(schema, self.tok, token_sets(self.tok, c.vocab_size), max_positions=max(room, 1)).tokens)
            check_context(self.model.config, len(req.prompt), length)
        except SchemaError as e:
            raise ApiError(400, f"response_format: {e}", "response_format") from None
        except RequestError as e:
            raise ApiError(400, str(e), "messages") from None

        def job(**fast) -> dict:
            out = [fill_json(self.model, self.tok, req.prompt, schema, req.settings, seed=req.seed + i, **fast)
                   for i in range(req.n)]
            return {"tokens": [f.tokens for f in out], "steps": [k for f in out for k in f.steps],
                    "repair_rounds": [f.rounds for f in out]}
        return job

    def completion(self, body: dict) -> tuple[list[Request], dict]:
        """/v1/completions (with `suffix`: the gap filled): a Request per prompt, and how to build
        the reply. Each prompt gets what it would get alone with the same seed; prompt k's choices
        are k * n ... k * n + n - 1."""
        refuse_unsupported(body)
        check_text_model(self.tok, self.name)
        prompts = completion_prompts(body.get("prompt"), self.model.config.vocab_size)
        suffix = field(body, "suffix", str)
        max_tokens = self.budget(body, "max_tokens", default=16)
        n, events, reqs, echoes = field(body, "n", int, 1, 1, 16), queue.Queue(), [], []
        for k, prompt in enumerate(prompts):
            text = prompt if isinstance(prompt, str) else self.tok.decode(prompt)
            canvas = None
            if suffix:  # the gap: max_tokens free positions, then the suffix pinned
                ids, canvas = parse_infill(self.tok, text.replace(FILL, "") + FILL + suffix, max_tokens)
            else:
                ids = self.tok.encode_raw(prompt) if isinstance(prompt, str) else list(prompt)
            reqs.append(self.request(body, ids, max_tokens, canvas, events=events, first_choice=k * n))
            echoes.append(text if field(body, "echo", bool, False) else "")
        how = {"kind": "completion", "stops": stops_of(body), "fill": max_tokens if suffix else None, "echo": echoes,
               "n": n, "max": max_tokens, "id": "cmpl-" + uuid.uuid4().hex[:24]}
        return reqs, self.with_schema(body, reqs, how)

    def infill(self, body: dict) -> tuple[list[Request], dict]:
        """llama.cpp's /infill: the Request (in a list), and how to build its reply."""
        extra = field(body, "input_extra", list, [])
        if not all(isinstance(x, dict) and isinstance(x.get("text", ""), str) for x in extra):
            raise ApiError(400, "input_extra must be a list of {filename, text}", "input_extra")
        left = "".join(f"{x.get('filename', '')}\n{x.get('text', '')}\n" for x in extra)
        left += field(body, "input_prefix", str, "") + field(body, "prompt", str, "")
        n = body.get("n_predict")
        n = 16 if n is None or (isinstance(n, int) and n < 0) else self.budget(body, "n_predict", default=16)
        suffix = field(body, "input_suffix", str, "")
        check_text_model(self.tok, self.name)
        # an empty left side (the top of a file) is a gap after <bos> alone, as llama.cpp answers it
        ids, canvas = parse_infill(self.tok, left.replace(FILL, "") + FILL + suffix.replace(FILL, ""), max(n, 1))
        ext = {**field(body, "diffusion", dict, {}), "cache_prompt": field(body, "cache_prompt", bool, True)}
        req = self.request(dict(body, diffusion=ext), ids, max(n, 1), canvas, prompt_field="input_prefix")
        if n == 0:  # llama.vim's warm-up: read the prompt into the cache, generate nothing
            req.settings = req.settings.copy()
            req.settings.max_new_tokens = 0
        return [req], {"kind": "infill", "stops": [], "fill": n, "max": n, "n": 1,
                       "id": "infill-" + uuid.uuid4().hex[:24]}

    # -- turning tokens into replies --------------------------------------------------------------

    def generated(self, tokens: list[int], how: dict) -> list[int]:
        """The tokens the model wrote: of a filled gap, those before the pinned suffix (up to an EOS)."""
        if how.get("fill") is None:
            return tokens
        tokens = tokens[: how["fill"]]
        return tokens[: next((i for i, t in enumerate(tokens) if t in self.model.config.eos_token_id), len(tokens))]

    def text_of(self, tokens: list[int], how: dict, final: bool, choice: int = 0) -> dict:
        """A choice's parts: content, reasoning, tool calls, finish reason (with the stop strings)."""
        tok = self.tok
        if "tool_call" in how:  # a forced call: the typed canvas's value is the call
            value, name = json.loads(tok.decode(tokens)), how["tool_call"]
            call = {"name": name, "arguments": value} if name else value
            return {"content": "", "reasoning": None, "calls": [call] if final else [], "finish": "tool_calls"}
        tokens = self.generated(tokens, how)
        split = tok.split_thought(tokens) if how["kind"] == "chat" else None
        answer, calls = tok.split_tool_calls(split.answer) if split else (tokens, [])
        text, stopped = cut_at_stop(tok.decode(answer), how["stops"])
        echo = how["echo"][choice // how["n"]] if how.get("echo") else ""  # completions: per prompt
        parts = {"content": echo + text,
                 "reasoning": tok.decode(split.thought) if split and split.thought is not None and how["thinking"] else None,
                 "calls": calls if final else []}
        parts["finish"] = "tool_calls" if calls else "stop" if stopped or len(tokens) < how["max"] else "length"
        return parts

    def choice(self, i: int, parts: dict, kind: str) -> dict:
        if kind != "chat":
            return {"index": i, "text": parts["content"], "logprobs": None, "finish_reason": parts["finish"]}
        message = {"role": "assistant", "content": parts["content"]}
        if parts["reasoning"] is not None:
            message["reasoning_content"] = parts["reasoning"]
        if parts["calls"]:
            message["tool_calls"] = tool_calls(parts["calls"])
        return {"index": i, "message": message, "logprobs": None, "finish_reason": parts["finish"]}

    def usage(self, reqs: list[Request], done: dict, how: dict) -> dict:
        prompt = sum(len(r.prompt) for r in reqs)
        completion = sum(len(self.generated(t, how)) for t in done["tokens"])
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": done["tokens_cached"]}}

    @staticmethod
    def wait(reqs: list[Request]) -> dict:
        """The "done" payloads of a request's prompts (they share one event queue) as one, choices in
        order; ApiError for an "error" event."""
        dones = []
        while len(dones) < len(reqs):
            kind, payload = reqs[0].events.get()
            if kind == "done":
                dones.append(payload)
            elif kind == "error":
                raise ApiError(payload["status"], payload["message"], kind="server_error")
        return merge_done(dones)

    def reply(self, reqs: list[Request], how: dict, done: dict) -> dict:
        """The whole (not streamed) reply."""
        parts = [self.text_of(t, how, True, i) for i, t in enumerate(done["tokens"])]
        if how["kind"] == "infill":
            req = reqs[0]
            n, prompt_ms = len(self.generated(done["tokens"][0], how)), done.get("prompt_seconds", 0.0) * 1e3
            ms = done["seconds"] * 1e3 - prompt_ms
            return {"content": parts[0]["content"], "tokens_cached": done["tokens_cached"], "truncated": False,
                    "stop": True, "model": self.name, "tokens_predicted": n, "tokens_evaluated": len(req.prompt),
                    "timings": {"prompt_n": len(req.prompt) - done["tokens_cached"], "prompt_ms": prompt_ms,
                                "predicted_n": n, "predicted_ms": ms, "predicted_per_second": n / max(ms / 1e3, 1e-9)}}
        obj = "chat.completion" if how["kind"] == "chat" else "text_completion"
        return {"id": how["id"], "object": obj, "created": int(time.time()), "model": self.name,
                "system_fingerprint": fingerprint(reqs[0].seed),
                "choices": [self.choice(i, p, how["kind"]) for i, p in enumerate(parts)],
                "usage": self.usage(reqs, done, how),
                "diffusion": {"seed": reqs[0].seed, "canvases": done["canvases"], "steps": done["steps"],
                              "rows_in_batch": done.get("rows_in_batch", 1),
                              **({"repair_rounds": done["repair_rounds"]} if "repair_rounds" in done else {})}}


def fingerprint(seed: int) -> str:
    """system_fingerprint names the seed a request drew from: seed-7, seed-m3 for -3."""
    return f"seed-{seed}" if seed >= 0 else f"seed-m{-seed}"


def merge_done(dones: list[dict]) -> dict:
    """One "done" payload from those of a request's prompts: tokens in choice order, counts added."""
    dones = sorted(dones, key=lambda d: d.get("first", 0))
    out = {"tokens": [t for d in dones for t in d["tokens"]], "canvases": max(d["canvases"] for d in dones),
           "steps": [k for d in dones for k in d["steps"]], "seconds": max(d["seconds"] for d in dones),
           "prompt_seconds": max(d.get("prompt_seconds", 0.0) for d in dones),
           "tokens_cached": sum(d["tokens_cached"] for d in dones),
           "rows_in_batch": max(d.get("rows_in_batch", 1) for d in dones)}
    if any("repair_rounds" in d for d in dones):
        out["repair_rounds"] = [k for d in dones for k in d.get("repair_rounds", [])]
    return out


def forced_call(tools, choice) -> tuple[dict, str | None] | None:
    """With tool_choice "required" or a named function: the JSON Schema of the call to write and the
    function's name (None: the value holds {"name", "arguments"}, one of several functions); else None."""
    if not tools or choice in (None, "auto", "none"):
        return None
    functions = {}
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise ApiError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\", \"parameters\"}}}}",
                           f"tools[{i}]")
        params = f.get("parameters") or {"type": "object"}
        if not isinstance(params, dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON Schema object", f"tools[{i}]")
        functions[f["name"]] = params
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        if name not in functions:
            raise ApiError(400, f"tool_choice names {name!r}, which is not one of the tools", "tool_choice")
        return functions[name], name
    if choice != "required":
        raise ApiError(400, "tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", ...}",
                       "tool_choice")
    if len(functions) == 1:
        return next(iter(functions.values())), next(iter(functions))
    return {"anyOf": [{"type": "object", "properties": {"name": {"const": n}, "arguments": p},
                       "required": ["name", "arguments"], "additionalProperties": False}
                      for n, p in functions.items()]}, None


def images_of(messages) -> tuple[list, list]:
    """messages with their image parts as chat templates take them ({"type": "image"}), and the
    images (PIL, RGB) in order. An image part is OpenAI's {"type": "image_url", "image_url": {"url":
    "data:image/...;base64,..."}} (this server reads no URL off the network)."""
    if not isinstance(messages, list):
        return messages, []
    out, pictures = [], []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict) or part.get("type") not in ("image_url", "image"):
                parts.append(part)
                continue
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
                raise ApiError(400, f"{where}.image_url.url must be a data: URL (data:image/png;base64,...): "
                               "this server reads no URL off the network", f"{where}.image_url")
            try:
                data = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
                pictures.append(read_image(io.BytesIO(data), name=f"the image of {where}"))
            except (binascii.Error, ValueError):
                raise ApiError(400, f"{where}.image_url.url is not valid base64", f"{where}.image_url") from None
            except ImageError as e:
                raise ApiError(400, str(e), f"{where}.image_url") from None
            parts.append({"type": "image"})
        out.append({**m, "content": parts})
    return out, pictures


def tool_calls(calls: list[dict]) -> list[dict]:
    """Parsed calls as OpenAI's tool_calls (the arguments as a JSON string)."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "index": i,
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}} for i, c in enumerate(calls)]
