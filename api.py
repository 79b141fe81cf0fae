"""The wire formats serve.py speaks: OpenAI's chat and text completions and llama.cpp's /infill,
each request checked field by field into a batcher.Request (an ApiError names the field that is
wrong), and the tokens a request got turned back into the reply its client expects: content, the
thought as reasoning_content, tool calls parsed from the model's own notation, finish reasons, usage.

    import torch; from api import Api; from batcher import Batcher; from generate import load
    model, tok = load("weights-code", "cpu", torch.float32)
    api = Api(model, tok, "weights-code", Batcher(model), api_key=None, max_tokens=4096)
    req, how = api.completion({"prompt": "def f(x):", "max_tokens": 8, "seed": 0})
    api.batcher.submit(req); print(api.reply(req, how, req.wait())["choices"][0]["text"]); api.batcher.stop()
"""

import base64
import binascii
import io
import json
import secrets
import time
import uuid

from batcher import Batcher, Request
from checkpoint import vision_config
from editing import FILL, Canvas, parse_infill, parse_pin, parse_template
from hfconfig import CheckpointError
from images import ImageError, image_patches, image_settings, place_images, read_image
from sampler import RequestError, check_context


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


class Api:
    """What the endpoints share: the model, its tokenizer and defaults, the worker."""

    def __init__(self, model, tok, name: str, batcher: Batcher, api_key: str | None, max_tokens: int):
        self.model, self.tok, self.name, self.batcher = model, tok, name, batcher
        self.api_key, self.max_tokens, self.created = api_key, max_tokens, int(time.time())

    def request(self, body: dict, ids: list[int], max_tokens: int, canvas: Canvas | None = None) -> Request:
        """The worker's Request: the settings, the diffusion extension, the seed, the checks."""
        ext = field(body, "diffusion", dict, {})
        settings = self.model.generation_settings.copy(
            max_new_tokens=max_tokens, steps=field(ext, "steps", int, None, 1, 1024, where="diffusion."),
            entropy_bound=field(ext, "entropy_bound", float, None, 1e-6, 1e6, where="diffusion."))
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
            raise ApiError(400, str(e), "max_tokens") from None
        seed = field(body, "seed", int, secrets.randbelow(2 ** 31), -2 ** 63, 2 ** 63 - 1)
        return Request(ids, settings, seed, field(body, "n", int, 1, 1, 16), pins or None,
                       bool(field(ext, "stream_canvas", bool, False)), field(ext, "cache_prompt", bool, True))

    def budget(self, body: dict, *names, default: int) -> int:
        for n in names:
            if body.get(n) is not None:
                return field(body, n, int, None, 0 if n == "n_predict" else 1, self.max_tokens)
        return default

    def chat(self, body: dict) -> tuple[Request, dict]:
        """/v1/chat/completions: the Request, and how to build its reply."""
        tools = field(body, "tools", list)
        if tools is not None and body.get("tool_choice") == "none":
            tools = None
        kwargs = field(body, "chat_template_kwargs", dict, {})
        thinking = bool(field(body, "thinking", bool, False) or kwargs.get("enable_thinking")
                        or body.get("reasoning_effort") not in (None, "none"))
        messages, pictures = images_of(field(body, "messages", list, []))
        settings = self.image_settings() if pictures else None
        try:
            ids = self.tok.apply_chat_template(messages, thinking=thinking, tools=tools)
        except (RequestError, CheckpointError) as e:
            raise ApiError(400, str(e), "messages") from None
        patches, ids = self.place(pictures, ids, settings) if pictures else (None, ids)
        max_tokens = self.budget(body, "max_completion_tokens", "max_tokens",
                                 default=self.model.generation_settings.max_new_tokens)
        req = self.request(body, ids, max_tokens)
        if patches:  # the same token ids may stand for other images: never from or into the prefix cache
            if body.get("response_format") is not None:
                raise ApiError(400, "response_format does not take images yet", "response_format")
            req.images, req.cache_prompt = patches, False
        how = {"kind": "chat", "stops": stops_of(body), "thinking": thinking, "max": req.settings.max_new_tokens,
               "id": "chatcmpl-" + uuid.uuid4().hex[:24]}
        if tools and body.get("response_format") is not None:
            raise ApiError(400, "response_format does not go with tools: the schema lays out the whole answer",
                           "response_format")
        return req, self.with_schema(body, req, how)

    def image_settings(self):
        """The checkpoint's image settings; a 400 when it has no vision tower."""
        path = getattr(self.model, "checkpoint_dir", None)
        try:
            vision_config(path, self.model.config)
            return image_settings(path, self.model.config)
        except CheckpointError as e:
            raise ApiError(400, f"this model cannot take images: {e}", "messages") from None

    def place(self, pictures: list, ids: list[int], s) -> tuple[list, list[int]]:
        """The images' patches, and ids with each image token expanded to the image's soft tokens."""
        patches = [image_patches(p, s) for p in pictures]
        try:
            return patches, place_images(ids, [p.n_soft for p in patches], s)
        except ImageError as e:
            raise ApiError(400, f"{e} (the chat template placed them)", "messages") from None

    def with_schema(self, body: dict, req: Request, how: dict) -> dict:
        """With a response_format that asks for JSON, the request becomes a job (json_job)."""
        schema = self.response_schema(body)
        if schema is not None:
            if req.pins:
                raise ApiError(400, "response_format does not go with a suffix or diffusion pins/template: the schema "
                               "lays out the whole answer", "response_format")
            req.job, how["max"] = self.json_job(req, schema), float("inf")
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
        """The batcher's job for a JSON Schema: req.n values, each editing.generate_json's (checked now:
        an unsupported keyword, or a canvas longer than the context, is a 400)."""
        from editing import generate_json
        from structured import SchemaError, build, check_schema, token_sets
        try:
            check_schema(schema)
            length = len(build(schema, self.tok, token_sets(self.tok, self.model.config.vocab_size)).tokens)
            check_context(self.model.config, len(req.prompt), length)
        except SchemaError as e:
            raise ApiError(400, f"response_format: {e}", "response_format") from None
        except RequestError as e:
            raise ApiError(400, str(e), "messages") from None

        def job(**fast) -> dict:
            out = [generate_json(self.model, self.tok, req.prompt, schema, req.settings, seed=req.seed + i, **fast)
                   for i in range(req.n)]
            return {"tokens": [f.tokens for f in out], "steps": [k for f in out for k in f.steps],
                    "repair_rounds": [f.rounds for f in out]}
        return job

    def completion(self, body: dict) -> tuple[Request, dict]:
        """/v1/completions (with `suffix`: the gap filled): the Request, and how to build its reply."""
        prompt = body.get("prompt")
        prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str) else prompt
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "prompt must be a non-empty string", "prompt")
        suffix = field(body, "suffix", str)
        max_tokens = self.budget(body, "max_tokens", default=16)
        canvas = None
        if suffix:  # the gap: max_tokens free positions, then the suffix pinned
            ids, canvas = parse_infill(self.tok, prompt.replace(FILL, "") + FILL + suffix, max_tokens)
        else:
            ids = self.tok.encode_raw(prompt)
        echo = prompt if field(body, "echo", bool, False) else ""
        req = self.request(body, ids, max_tokens, canvas)
        how = {"kind": "completion", "stops": stops_of(body), "fill": max_tokens if suffix else None, "echo": echo,
               "max": max_tokens, "id": "cmpl-" + uuid.uuid4().hex[:24]}
        return req, self.with_schema(body, req, how)

    def infill(self, body: dict) -> tuple[Request, dict]:
        """llama.cpp's /infill: the Request, and how to build its reply."""
        extra = field(body, "input_extra", list, [])
        if not all(isinstance(x, dict) and isinstance(x.get("text", ""), str) for x in extra):
            raise ApiError(400, "input_extra must be a list of {filename, text}", "input_extra")
        left = "".join(f"{x.get('filename', '')}\n{x.get('text', '')}\n" for x in extra)
        left += field(body, "input_prefix", str, "") + field(body, "prompt", str, "")
        n = body.get("n_predict")
        n = 16 if n is None or (isinstance(n, int) and n < 0) else self.budget(body, "n_predict", default=16)
        suffix = field(body, "input_suffix", str, "")
        ids, canvas = parse_infill(self.tok, (left or "\n").replace(FILL, "") + FILL + suffix.replace(FILL, ""), max(n, 1))
        ext = {**field(body, "diffusion", dict, {}), "cache_prompt": field(body, "cache_prompt", bool, True)}
        req = self.request(dict(body, diffusion=ext), ids, max(n, 1), canvas)
        if n == 0:  # llama.vim's warm-up: read the prompt into the cache, generate nothing
            req.settings = req.settings.copy()
            req.settings.max_new_tokens = 0
        return req, {"kind": "infill", "stops": [], "fill": n, "max": n, "id": "infill-" + uuid.uuid4().hex[:24]}

    # -- turning tokens into replies --------------------------------------------------------------

    def generated(self, tokens: list[int], how: dict) -> list[int]:
        """The tokens the model wrote: of a filled gap, those before the pinned suffix (up to an EOS)."""
        if how.get("fill") is None:
            return tokens
        tokens = tokens[: how["fill"]]
        return tokens[: next((i for i, t in enumerate(tokens) if t in self.model.config.eos_token_id), len(tokens))]

    def text_of(self, tokens: list[int], how: dict, final: bool) -> dict:
        """A choice's parts: content, reasoning, tool calls, finish reason (with the stop strings)."""
        tok = self.tok
        tokens = self.generated(tokens, how)
        split = tok.split_thought(tokens) if how["kind"] == "chat" else None
        answer, calls = tok.split_tool_calls(split.answer) if split else (tokens, [])
        text, stopped = cut_at_stop(tok.decode(answer), how["stops"])
        parts = {"content": how.get("echo", "") + text,
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

    def usage(self, req: Request, done: dict, how: dict) -> dict:
        completion = sum(len(self.generated(t, how)) for t in done["tokens"])
        return {"prompt_tokens": len(req.prompt), "completion_tokens": completion,
                "total_tokens": len(req.prompt) + completion,
                "prompt_tokens_details": {"cached_tokens": done["tokens_cached"]}}

    def reply(self, req: Request, how: dict, done: dict) -> dict:
        """The whole (not streamed) reply."""
        parts = [self.text_of(t, how, True) for t in done["tokens"]]
        if how["kind"] == "infill":
            ms, n = done["seconds"] * 1e3, len(self.generated(done["tokens"][0], how))
            return {"content": parts[0]["content"], "tokens_cached": done["tokens_cached"], "truncated": False,
                    "stop": True, "model": self.name, "tokens_predicted": n, "tokens_evaluated": len(req.prompt),
                    "timings": {"prompt_n": len(req.prompt) - done["tokens_cached"], "prompt_ms": 0.0,
                                "predicted_n": n, "predicted_ms": ms, "predicted_per_second": n / max(ms / 1e3, 1e-9)}}
        obj = "chat.completion" if how["kind"] == "chat" else "text_completion"
        return {"id": how["id"], "object": obj, "created": int(time.time()), "model": self.name,
                "system_fingerprint": f"seed-{req.seed}", "choices": [self.choice(i, p, how["kind"]) for i, p in enumerate(parts)],
                "usage": self.usage(req, done, how),
                "diffusion": {"seed": req.seed, "canvases": done["canvases"], "steps": done["steps"],
                              "rows_in_batch": done.get("rows_in_batch", 1),
                              **({"repair_rounds": done["repair_rounds"]} if "repair_rounds" in done else {})}}


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
