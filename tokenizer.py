"""The tokenizer and the chat format: text to token ids and back, as transformers would give them.

A checkpoint's `tokenizer.json` is read with Hugging Face `tokenizers`. Its chat format is the
checkpoint's own template (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`),
rendered with jinja2 exactly as transformers 5.17.0 renders it (utils/chat_template_utils.py): a
sandboxed environment with trim_blocks, lstrip_blocks and loop controls, `raise_exception`,
`bos_token`, `add_generation_prompt` and `enable_thinking`. So the prompt follows whichever
revision of the template a download holds: the release one ends a non-thinking prompt with an
empty thought block `<|channel>thought\n<channel|>`, the rewritten one of 2026-07 does not.
A tokenizer with the Gemma 4 turn markers but no template gets CANONICAL_FORMAT (the 2026-07
template for system, user and assistant messages); one without them is plain text.

The model may think before it answers, `<|channel>thought\n...<channel|>` in its reply, and call
tools, `<|tool_call>call:NAME{key:<|"|>text<|"|>,n:3}<tool_call|>` (the template's own notation for
the arguments); split_thought and split_tool_calls take both apart from the answer, by token id.

    from tokenizer import load_tokenizer
    tok = load_tokenizer("weights-code")
    ids = tok.encode("def f(x):")
    text = tok.decode(ids)
"""

import json
from dataclasses import dataclass
from pathlib import Path

from hfconfig import CheckpointError, read_json
from sampler import RequestError, check_context

TURN_OPEN, TURN_CLOSE, THINK = "<|turn>", "<turn|>", "<|think|>"
CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
CALL_OPEN, CALL_CLOSE, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
IMAGE = "<|image|>"  # where the chat template puts an image (images.py expands it to its soft tokens)
ROLES = ("system", "developer", "user", "assistant", "tool")


def check_messages(messages) -> list[dict]:
    """A conversation as chat templates take it: [{"role", "content": str | [parts] | None, ...}];
    an assistant's tool_calls get their JSON-string arguments parsed (templates want mappings).
    RequestError naming the message and the field that is wrong."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}")
        content = m.get("content")
        parts_ok = isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in content)
        if not (isinstance(content, str) or parts_ok or (content is None and (m.get("tool_calls") or m["role"] == "tool"))):
            raise RequestError(f"{where}.content must be a string or a list of content parts")
        m = dict(m)
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise RequestError(f"{where}.tool_calls must be a list")
            m["tool_calls"] = [call_for_template(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
        out.append(m)
    return out


def call_for_template(call, where: str) -> dict:
    """An OpenAI tool call with its arguments as a mapping (they arrive as a JSON string)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise RequestError(f"{where}.function.name must be a string")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise RequestError(f"{where}.function.arguments is not valid JSON") from None
    if args is not None and not isinstance(args, dict):
        raise RequestError(f"{where}.function.arguments must be a JSON object")
    return {**call, "function": {**fn, "arguments": args}}


def parse_call(text: str) -> dict:
    """`call:NAME{key:value,...}` in the template's notation -> {"name": NAME, "arguments": {...}}:
    strings between <|"|> marks, numbers, true/false/null, {...} and [...]; ValueError otherwise."""
    if not text.startswith("call:") or "{" not in text:
        raise ValueError(f"not a tool call: {text[:40]!r}")
    name, rest = text[5:].split("{", 1)
    value, end = _parse_value("{" + rest, 0)
    if text[5 + len(name) + end:].strip():
        raise ValueError("text after the arguments")
    return {"name": name.strip(), "arguments": value}


def _parse_value(s: str, i: int):
    """(value, index after it) of the template's notation at s[i:]."""
    if s.startswith(QUOTE, i):
        j = s.index(QUOTE, i + len(QUOTE))
        return s[i + len(QUOTE): j], j + len(QUOTE)
    if s[i] in "{[":
        close, items, i = "}" if s[i] == "{" else "]", [], i + 1
        while s[i] != close:
            if close == "}":
                key_end = s.index(":", i)
                key = s[i:key_end].strip()
                key = key[len(QUOTE):-len(QUOTE)] if key.startswith(QUOTE) else key
                value, i = _parse_value(s, key_end + 1)
                items.append((key, value))
            else:
                value, i = _parse_value(s, i)
                items.append(value)
            if s[i] == ",":
                i += 1
            elif s[i] != close:
                raise ValueError(f"expected , or {close} at {i}")
        return (dict(items) if close == "}" else items), i + 1
    j = i
    while j < len(s) and s[j] not in ",}]":
        j += 1
    word = s[i:j].strip()
    if word in ("true", "false", "null"):
        return {"true": True, "false": False, "null": None}[word], j
    return (float(word) if any(c in word for c in ".eE") else int(word)), j


def strip_thinking(text: str) -> str:
    """Remove every <|channel>...<channel|> span (the template's own macro), then trim."""
    out = ""
    for part in text.split(CHANNEL_CLOSE):
        out += part.split(CHANNEL_OPEN)[0] if CHANNEL_OPEN in part else part
    return out.strip()


def canonical_format(messages: list[dict], bos: str, add_generation_prompt: bool, thinking: bool) -> str:
    """The Gemma 4 canonical chat template (2026-07) for system/user/assistant messages, in Python;
    content a string or text and image parts."""
    out = bos
    rest = messages
    if thinking or (messages and messages[0]["role"] in ("system", "developer")):
        out += f"{TURN_OPEN}system\n" + (f"{THINK}\n" if thinking else "")
        if messages and messages[0]["role"] in ("system", "developer"):
            out += messages[0]["content"].strip()
            rest = messages[1:]
        out += f"{TURN_CLOSE}\n"
    for m in rest:
        role = "model" if m["role"] == "assistant" else m["role"]
        parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
        content = "".join(IMAGE if p["type"] != "text" else strip_thinking(p["text"]) if role == "model"
                          else p["text"].strip() for p in parts)
        out += f"{TURN_OPEN}{role}\n{content}{TURN_CLOSE}\n"
    if add_generation_prompt:
        out += f"{TURN_OPEN}model\n"
    return out


@dataclass(frozen=True)
class ChatFormat:
    """How a prompt is put to the model: one user turn of the checkpoint's chat format (after a
    system prompt, if any; thinking first, if asked), or raw: the text as written, with the
    tokenizer's own <bos>. request.check_chat refuses what a tokenizer cannot take."""
    raw: bool = False
    thinking: bool = False
    system: str | None = None


@dataclass
class Thought:
    """A reply split at its thought channel: thought is None when the model did not think (a reply
    that ends inside its thought has all of it as the thought, and no answer)."""
    answer: list[int]
    thought: list[int] | None = None


class Tokenizer:
    """tokenizer.json plus the checkpoint's chat template."""

    def __init__(self, path: Path, template: str | None = None, template_file: str | None = None,
                 bos_token: str = "<bos>"):
        from tokenizers import Tokenizer as HFTokenizer
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable tokenizer.json ({str(e).splitlines()[0]}); "
                                  "download it again") from None
        self.bos_token = bos_token
        self.template_file = template_file or "the chat template"
        self.template = None if template is None else compile_template(template, self.template_file)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    @property
    def is_chat(self) -> bool:
        """A chat template, or the Gemma 4 turn markers of instruction-tuned tokenizers."""
        return self.template is not None or (self.token_id(TURN_OPEN) is not None
                                             and self.token_id(TURN_CLOSE) is not None)

    def encode(self, text: str) -> list[int]:
        """Token ids of text, special-token strings included, with nothing added (no <bos>)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_raw(self, text: str) -> list[int]:
        """Token ids of text with what the tokenizer itself adds (Gemma: <bos> first)."""
        return self.tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def decode_visible(self, ids: list[int]) -> str:
        """Special tokens shown (for --print-prompt)."""
        return self.tok.decode(ids, skip_special_tokens=False)

    def render_chat(self, messages: list[dict], thinking: bool = False, add_generation_prompt: bool = True,
                    tools: list | None = None) -> str:
        """The prompt text of a conversation (transformers' apply_chat_template(tokenize=False)); tools:
        OpenAI-style function declarations, which the checkpoint's template renders."""
        messages = check_messages(messages)
        if not self.is_chat:
            raise RequestError("this tokenizer has no chat format (no chat template, no turn markers): a conversation "
                               "needs an instruction-tuned checkpoint")
        if self.template is None:
            plain = all((isinstance(m["content"], str) or all(p["type"] in ("text", "image", "image_url")
                                                              for p in m["content"]))
                        and m["role"] != "tool" and not m.get("tool_calls") for m in messages)
            if tools or not plain:
                raise RequestError("tools, tool messages and content parts other than text and images need the "
                                   "checkpoint's own chat template")
            return canonical_format(messages, self.bos_token, add_generation_prompt, thinking)
        import jinja2
        try:
            return self.template.render(messages=messages, bos_token=self.bos_token, enable_thinking=thinking,
                                        add_generation_prompt=add_generation_prompt, tools=tools)
        except jinja2.TemplateError as e:
            raise CheckpointError(f"{self.template_file} failed on this conversation: {e}") from None

    def apply_chat_template(self, messages: list[dict], thinking: bool = False, add_generation_prompt: bool = True,
                            tools: list | None = None) -> list[int]:
        """Token ids of a conversation [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...]."""
        return self.encode(self.render_chat(messages, thinking, add_generation_prompt, tools))

    def prompt_ids(self, text: str, chat: ChatFormat = ChatFormat(), images: int = 0) -> list[int]:
        """One user turn (after an optional system prompt) ready for the model to answer, in the chat
        format when the tokenizer has one and the prompt is not raw; else the text as the tokenizer
        encodes it. images: that many images before the text, each where the template writes it (one
        <|image|> token, images.place_images expands it); a raw text writes <|image|> itself."""
        if chat.raw or not self.is_chat:
            return self.encode_raw(text)
        content = text if not images else [{"type": "image"}] * images + [{"type": "text", "text": text}]
        system = [{"role": "system", "content": chat.system}] if chat.system else []
        return self.apply_chat_template(system + [{"role": "user", "content": content}], thinking=chat.thinking)

    def split_thought(self, ids: list[int]) -> Thought:
        """Separate `<|channel>thought\\n ... <channel|>` from the answer, by token id."""
        open_id, close_id = self.token_id(CHANNEL_OPEN), self.token_id(CHANNEL_CLOSE)
        if open_id is None or open_id not in ids:
            return Thought(answer=list(ids))
        start = ids.index(open_id)
        end = ids.index(close_id, start) if close_id is not None and close_id in ids[start:] else None
        inner = ids[start + 1: end]
        label = self.encode("thought\n")  # the channel's name, not part of the thought
        if inner[: len(label)] == label:
            inner = inner[len(label):]
        answer = ids[:start] + ([] if end is None else ids[end + 1:])
        return Thought(answer=answer, thought=inner)

    def split_tool_calls(self, ids: list[int]) -> tuple[list[int], list[dict]]:
        """The answer without its `<|tool_call>...<tool_call|>` spans, and each call parsed
        ({"name", "arguments"}); a span that does not parse stays in the answer."""
        open_id, close_id = self.token_id(CALL_OPEN), self.token_id(CALL_CLOSE)
        if open_id is None or open_id not in ids:
            return list(ids), []
        answer, calls, i = [], [], 0
        while i < len(ids):
            if ids[i] == open_id and close_id in ids[i:]:
                end = ids.index(close_id, i)
                try:
                    calls.append(parse_call(self.decode_visible(ids[i + 1: end]).strip()))
                    i = end + 1
                    continue
                except (ValueError, IndexError):
                    pass
            answer.append(ids[i])
            i += 1
        return answer, calls


def encode_prompt(tok: Tokenizer, text: str, config, max_new_tokens: int, chat: ChatFormat = ChatFormat(), *,
                  name: str = "prompt", images: int = 0) -> list[int]:
    """A user turn ready for the model (config: its DiffusionGemmaConfig) in the checkpoint's chat
    format (plain text when raw, or for a tokenizer without one); RequestError for a prompt that is
    not text or is empty, a token the model has no embedding for, or one too long for its positions.
    images: as prompt_ids."""
    if not isinstance(text, str):
        raise RequestError(f"the {name} must be a string, not {type(text).__name__}")
    if not text.strip():
        raise RequestError(f"the {name} is empty")
    ids = tok.prompt_ids(text, chat, images=images)
    if ids and max(ids) >= config.vocab_size:
        raise RequestError(f"the {name} holds a token the model has no embedding for "
                           f"({tok.decode_visible([max(ids)])!r}): leave it out")
    check_context(config, len(ids), max_new_tokens, name)
    return ids


def compile_template(source: str, name: str):
    """A jinja2 template set up as transformers 5.17.0 sets it up."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise CheckpointError(f"{name} is not a valid jinja template ({e}); download it again") from None


def token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(checkpoint: str | Path, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint directory and its template; CheckpointError for one with more
    tokens than the model (vocab_size) has embeddings."""
    path = Path(checkpoint) / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: the checkpoint has no tokenizer.json; give a tokenizer file")
    config, template, template_file = {}, None, None
    config_file = path.parent / "tokenizer_config.json"
    if config_file.is_file():
        config = read_json(config_file)
    jinja_file = path.parent / "chat_template.jinja"
    if jinja_file.is_file():
        template, template_file = jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    elif isinstance(config.get("chat_template"), str):
        template, template_file = config["chat_template"], f"the chat_template of {config_file}"
    tok = Tokenizer(path, template, template_file, bos_token=token_text(config.get("bos_token")) or "<bos>")
    base = tok.tok.get_vocab_size(with_added_tokens=False)  # Gemma's adds an image placeholder beyond it
    if vocab_size is not None and base > vocab_size:
        raise CheckpointError(f"{path} has {base} tokens but the model only {vocab_size}: "
                              "use the tokenizer that came with the checkpoint")
    return tok
