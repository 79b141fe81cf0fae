"""Typed canvases: a JSON Schema as a canvas whose skeleton is pinned and whose values are holes,
each position restricted to the tokens its type allows; and the schema's own validation. Filling
such a canvas, repairing it and best-of-N are canvas editing (editing.fill_json).

The layout (build):
  skeleton  braces, keys, colons, commas, the quotes around strings, constants: pinned tokens
  holes     every value: a few positions, each with a token set (Allowed) from the
            tokenizer's own vocabulary (TokenSets: a byte-level BPE token can hold several characters)
    string    tokens that may stand inside a JSON string (no quote, backslash or control character);
              with minLength / maxLength, only tokens whose lengths keep the total within them
    pattern   one position a character, each taking the one-character tokens of its class
    integer   digits chosen so that every number the hole can hold is within [minimum, maximum]
    enum, boolean   one-token strings: one position taking those tokens; otherwise each position
              takes what some option has there (or a space), and a filling that is no option snaps
    array     minItems (else min(maxItems, 2)) items; object: its properties in order, optional ones too
    anyOf     a branch per sample (sample i: branch i mod their number)
A keyword this cannot guarantee is refused (check_schema), naming it, never ignored. validate()
judges a value by the schema, not the model.

    from tokenizer import Tokenizer; from structured import build, token_sets
    tok = Tokenizer("weights-code/tokenizer.json")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 90}}}
    layout = build(schema, tok, token_sets(tok, 8192))
    print("".join("_" if t is None else tok.decode([t]) for t in layout.tokens))
"""

import json
import math
import re
from dataclasses import dataclass, field

import torch

from sampler import RequestError, in_canvas

@dataclass
class Allowed:
    """Which tokens positions may take, for block_diffusion's allowed=: `sets`, a small table of
    token-id lists, and per row (or one for every row) {offset from the first new token: index into
    sets}; other positions are free. A JSON value's hole, a Sudoku cell, a field of digits."""
    sets: list[list[int]]
    rows: list[dict[int, int]]

    def for_canvas(self, ci: int, B: int, C: int, V: int, device) -> tuple | None:
        """sampler.restrict's pair for canvas ci of B rows: (bias (S, V): 0 where allowed, -inf
        elsewhere; [(flat positions (B*C) of a set, set index)]), or None when it restricts nothing."""
        groups: dict[int, list[int]] = {}
        for b, j, k in in_canvas(self.rows, ci, B, C):
            groups.setdefault(k, []).append(b * C + j)
        if not groups:
            return None
        bias = torch.full((len(self.sets), V), float("-inf"), device=device)
        for k, ids in enumerate(self.sets):
            bias[k, torch.tensor(ids, dtype=torch.long, device=device)] = 0.0
        return bias, [(torch.tensor(rows, device=device), k) for k, rows in sorted(groups.items())]


ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly",
               "writeOnly", "type", "enum", "const", "anyOf"}
KEYWORDS = {"object": {"properties", "required", "additionalProperties"},
            "string": {"maxLength", "minLength", "pattern"},
            "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
            "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
            "boolean": set(), "null": set(), "array": {"items", "maxItems", "minItems"}}
STRING_BUDGET = 6  # positions of a string hole without maxLength
MAX_SPAN = 10 ** 6  # an unbounded integer: 0 .. this


class SchemaError(RequestError):
    """A schema this cannot fill as asked: the message names the path and the keyword."""


# --- The vocabulary, by what a token may be in JSON ----------------------------------------------

class TokenSets:
    """Token ids of a tokenizer by what they may stand for: inside a string, one character, spaces."""

    def __init__(self, tok, vocab_size: int):
        # special tokens decode to nothing (skip_special_tokens), and so belong to no set
        self.texts = tok.tok.decode_batch([[i] for i in range(vocab_size)], skip_special_tokens=True)
        self.string = [i for i, t in enumerate(self.texts) if in_string(t)]
        self.chars: dict[str, list[int]] = {}
        for i, t in enumerate(self.texts):
            if len(t) == 1:
                self.chars.setdefault(t, []).append(i)
        if " " not in self.chars:
            raise SchemaError("the tokenizer has no token for a space: a typed canvas needs one")
        self.space = self.chars[" "][0]

    def string_of_length(self, shortest: int, longest: int) -> list[int]:
        """String tokens of shortest..longest characters."""
        return [i for i in self.string if shortest <= len(self.texts[i]) <= longest]

    def one_char(self, allowed) -> list[int]:
        """The one-character tokens whose character is in `allowed` (a string or a predicate)."""
        ok = allowed if callable(allowed) else (lambda c: c in allowed)
        return [i for c, ids in self.chars.items() if ok(c) and in_string(c) for i in ids]


def in_string(text: str) -> bool:
    """Whether text may stand inside a JSON string as it is (and is whole text, not a byte piece)."""
    return bool(text) and "\ufffd" not in text and not any(c in '"\\' or ord(c) < 0x20 for c in text)


_sets_cache: dict[int, TokenSets] = {}


def token_sets(tok, vocab_size: int) -> TokenSets:
    """TokenSets of a tokenizer, made once."""
    if id(tok.tok) not in _sets_cache:
        _sets_cache[id(tok.tok)] = TokenSets(tok, vocab_size)
    return _sets_cache[id(tok.tok)]


# --- A schema as a canvas ------------------------------------------------------------------------

@dataclass
class Hole:
    """The positions of one value: where they start, their set (an index into Layout.sets) each,
    what a valid filling is (check), and the options of a choice."""
    path: str
    start: int
    sets: list[int]
    check: object  # tokens -> bool
    options: list[list[int]] = field(default_factory=list)


@dataclass
class Layout:
    """A canvas for a schema: a pinned token or None (a hole position) at each offset."""
    tokens: list = field(default_factory=list)
    holes: list = field(default_factory=list)
    sets: list = field(default_factory=list)
    pending: str = ""  # pinned text not yet tokenized

    def pin(self, text: str) -> None:  # tokenized with the pinned text that follows it (flush)
        self.pending += text

    def flush(self, tok) -> None:
        if self.pending:
            self.tokens += tok.encode(self.pending)
            self.pending = ""

    def set_id(self, ids: list[int]) -> int:
        key = sorted(set(ids))
        if key not in self.sets:
            self.sets.append(key)
        return self.sets.index(key)

    def hole(self, tok, path: str, position_sets: list[list[int]], check, options=()) -> None:
        self.flush(tok)
        h = Hole(path, len(self.tokens), [self.set_id(s) for s in position_sets], check, list(options))
        self.tokens += [None] * len(h.sets)
        self.holes.append(h)


def check_keywords(schema: dict, path: str) -> None:
    """SchemaError for a keyword this cannot guarantee (refused, not ignored)."""
    if not isinstance(schema, dict):
        raise SchemaError(f"{path}: a schema must be an object, not {json.dumps(schema)[:40]}")
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds] if kinds else []
    known = set(ANNOTATIONS)
    for k in kinds:
        if k not in KEYWORDS:
            raise SchemaError(f"{path}: type {k!r} is not supported "
                              "(object, array, string, integer, number, boolean, null)")
        known |= KEYWORDS[k]
    if not kinds and "enum" not in schema and "const" not in schema and "anyOf" not in schema:
        known |= KEYWORDS["object"] if "properties" in schema else set()
    for name in ("enum", "anyOf"):
        if name in schema and (not isinstance(schema[name], list) or not schema[name]):
            raise SchemaError(f"{path}: {name} must be a non-empty list")
    unsupported = sorted(set(schema) - known)
    if unsupported:
        raise SchemaError(f"{path}: unsupported keyword{'s' * (len(unsupported) > 1)} {', '.join(unsupported)}")


def build(schema: dict, tok, sets: TokenSets, branch: int = 0) -> Layout:
    """The canvas of a schema (branch: which anyOf branch to take, everywhere)."""
    out = Layout()
    value(schema, "$", out, tok, sets, branch)
    out.flush(tok)
    return out


def value(schema: dict, path: str, out: Layout, tok, sets: TokenSets, branch: int) -> None:
    """Lay out the value a schema describes at the end of `out`: pinned text and holes."""
    check_keywords(schema, path)
    if "const" in schema:
        return out.pin(json.dumps(schema["const"]))
    if "enum" in schema:
        return choice(path, schema["enum"], out, tok, sets)
    if "anyOf" in schema:
        k = branch % len(schema["anyOf"])
        return value(schema["anyOf"][k], f"{path}.anyOf[{k}]", out, tok, sets, branch)
    kind = schema.get("type") or ("object" if "properties" in schema else "string")
    if isinstance(kind, list):  # a list of types: a branch, like anyOf, with that type's keywords
        one = kind[branch % len(kind)]
        return value({k: v for k, v in schema.items() if k in ANNOTATIONS or k in KEYWORDS[one]} | {"type": one},
                     path, out, tok, sets, branch)
    if kind == "null":
        return out.pin("null")
    if kind == "boolean":
        return choice(path, [True, False], out, tok, sets)
    if kind in ("integer", "number"):
        return number(schema, path, out, tok, sets)
    if kind == "string":
        return string(schema, path, out, tok, sets)
    if kind == "array":
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        n = lo if "minItems" in schema else min(hi, 2) if hi is not None else 2
        if hi is not None and n > hi:
            raise SchemaError(f"{path}: minItems {lo} is above maxItems {hi}")
        out.pin("[")
        for i in range(n):
            out.pin(", " if i else "")
            value(schema.get("items", {"type": "string"}), f"{path}[{i}]", out, tok, sets, branch)
        return out.pin("]")
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        raise SchemaError(f"{path}: properties must be an object")
    extra = schema.get("additionalProperties", {})
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(k, str) for k in required):
        raise SchemaError(f"{path}: required must be a list of property names")
    props = {**props, **{k: extra for k in required if k not in props}}  # required, yet not described
    if any(v is False for v in props.values()):
        raise SchemaError(f"{path}: a required property is not allowed (additionalProperties is false)")
    if not props and "properties" not in schema and extra is not False:  # any object: a key and its value
        out.pin('{"')
        string({"maxLength": 8, "minLength": 1}, f"{path}.<key>", out, tok, sets, quoted=False)
        out.pin('": ')
        value(extra if isinstance(extra, dict) and extra else {"type": "string"}, f"{path}.<value>", out, tok, sets,
              branch)
        return out.pin("}")
    out.pin("{")
    for i, (key, sub) in enumerate(props.items()):
        out.pin((", " if i else "") + json.dumps(key) + ": ")
        value(sub, f"{path}.{key}", out, tok, sets, branch)
    out.pin("}")


def choice(path: str, values: list, out: Layout, tok, sets: TokenSets) -> None:
    """One of the values. Strings that are one token each: the quotes pinned and one position that
    takes those tokens (valid by construction). Otherwise each position takes what some option has
    there, or a space; a filling that is no option snaps to the nearest (finish)."""
    inner = [tok.encode(v) if isinstance(v, str) else [] for v in values]
    if all(len(e) == 1 and tok.decode(e) == v for e, v in zip(inner, values)):
        words = set(values)
        out.pin('"')
        out.hole(tok, path, [[e[0] for e in inner]], lambda t: tok.decode(t) in words, options=inner)
        return out.pin('"')
    options = [json.dumps(v) for v in values]
    encoded = [tok.encode(o) for o in options]
    shortest, texts = min(map(len, encoded)), set(options)
    position_sets = [{e[j] for e in encoded if len(e) > j} | ({sets.space} if j >= shortest else set())
                     for j in range(max(map(len, encoded)))]
    out.hole(tok, path, position_sets, lambda t: tok.decode(t).strip() in texts, options=encoded)


def bounds(schema: dict, path: str) -> tuple[int, int]:
    """The whole numbers [lo, hi] a number may be (unbounded: a span of MAX_SPAN)."""
    for name in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        if schema.get(name) is not None and type(schema[name]) not in (int, float):
            raise SchemaError(f"{path}: {name} must be a number")
    los = [math.ceil(schema["minimum"])] if schema.get("minimum") is not None else []
    his = [math.floor(schema["maximum"])] if schema.get("maximum") is not None else []
    los += [math.floor(schema["exclusiveMinimum"]) + 1] if schema.get("exclusiveMinimum") is not None else []
    his += [math.ceil(schema["exclusiveMaximum"]) - 1] if schema.get("exclusiveMaximum") is not None else []
    lo, hi = max(los, default=None), min(his, default=None)
    if lo is None and hi is None:
        lo, hi = 0, MAX_SPAN
    elif lo is None:
        lo = 0 if hi >= 0 else hi - MAX_SPAN
    elif hi is None:
        hi = lo + MAX_SPAN
    if lo > hi:
        raise SchemaError(f"{path}: no whole number lies between its minimum and maximum")
    return lo, hi


def number(schema: dict, path: str, out: Layout, tok, sets: TokenSets) -> None:
    """A whole number (integer or number) every filling of which is within the bounds: the digits
    the bounds fix are pinned, then free digits whose first is chosen to keep the rest in range."""
    lo, hi = bounds(schema, path)
    if hi < 0:  # all negative: a minus sign, then the digits of the magnitude
        out.pin("-")
        lo, hi = -hi, -lo
    lo = max(lo, 0)
    prefix, firsts, width = digit_plan(lo, hi)
    out.pin(prefix)
    if width == 0:  # one number only: pinned
        return
    digit = [sets.one_char(str(d)) for d in range(10)]
    if not all(digit):
        raise SchemaError(f"{path}: the tokenizer has no one-digit tokens")
    position_sets = [[i for d in firsts for i in digit[d]]] + [[i for d in range(10) for i in digit[d]]] * (width - 1)
    lo_, hi_ = lo, hi

    def in_range(tokens):
        text = tok.decode(tokens)
        return len(text) == width and text.isdigit() and lo_ <= int(prefix + text) <= hi_

    out.hole(tok, path, position_sets, in_range)


def digit_plan(lo: int, hi: int) -> tuple[str, list[int], int]:
    """(digits pinned, first digits allowed, width of the free digits) such that every number written
    prefix + first + free digits lies in [lo, hi] (0 <= lo <= hi), and it is a valid JSON number:
    of the widths lo..hi span, the one that leaves the most numbers to choose from."""
    best = None
    for w in range(len(str(lo)), len(str(hi)) + 1):
        plan = fixed_width(max(lo, 10 ** (w - 1) if w > 1 else 0), min(hi, 10 ** w - 1), w, "")
        size = len(plan[1]) * 10 ** (plan[2] - 1) if plan[2] else 1
        if best is None or size > best[0]:
            best = (size, plan)
    return best[1]


def fixed_width(lo: int, hi: int, w: int, prefix: str) -> tuple[str, list[int], int]:
    """digit_plan for numbers of w digits (leading zeros allowed after a prefix)."""
    if lo == hi:
        return prefix + (str(lo).zfill(w) if prefix else str(lo)), [], 0
    span = 10 ** (w - 1)
    least = 0 if prefix or w == 1 else 1
    full = [d for d in range(least, 10) if lo <= d * span and (d + 1) * span - 1 <= hi]
    if full:
        return prefix, full, w
    d = hi // span  # no whole run of one leading digit fits: pin the top one, and plan under it
    return fixed_width(max(lo - d * span, 0), hi - d * span, w - 1, prefix + str(d))


def string(schema: dict, path: str, out: Layout, tok, sets: TokenSets, quoted: bool = True) -> None:
    """A JSON string: its content positions take only tokens that may stand inside one, and with
    minLength / maxLength only tokens whose lengths keep the total within them."""
    lo, hi = schema.get("minLength", 0), schema.get("maxLength")
    if any(v is not None and (type(v) is not int or v < 0) for v in (lo, hi)):
        raise SchemaError(f"{path}: minLength and maxLength must be whole numbers >= 0")
    if hi is not None and lo > hi:
        raise SchemaError(f"{path}: minLength {lo} is above maxLength {hi}")
    if quoted:
        out.pin('"')
    if "pattern" in schema:
        pattern_hole(schema["pattern"], path, out, tok, sets)
    elif hi != 0:
        n, shortest, longest = string_plan(lo, hi)
        ids = sets.string_of_length(shortest, longest)
        if not ids and lo:  # no tokens that long: one character a position
            n, ids = lo, sets.string_of_length(1, 1)
        if not ids:
            raise SchemaError(f"{path}: the tokenizer has no tokens of {shortest} to {longest} characters")
        most = hi if hi is not None else math.inf
        out.hole(tok, path, [ids] * n, lambda t: in_string(tok.decode(t)) and lo <= len(tok.decode(t)) <= most)
    if quoted:
        out.pin('"')


def string_plan(lo: int, hi: int | None) -> tuple[int, int, int]:
    """(positions n, shortest, longest token in characters) such that any n tokens of those lengths
    make a string of lo..hi characters: up to STRING_BUDGET positions, as long tokens as allowed."""
    if hi is None:
        return STRING_BUDGET, max(-(-lo // STRING_BUDGET), 1), 10 ** 9
    for n in range(min(hi, STRING_BUDGET), 0, -1):
        if -(-lo // n) <= hi // n:
            return n, max(-(-lo // n), 1), hi // n
    return lo, 1, 1  # lo..hi admits no n <= the budget: one character a position


PATTERN_ATOM = re.compile(r"\\d|\\w|\\s|\[(\^?)((?:\\.|[^\]\\])+)\]|\\(.)|\.|([^\\\[\](){}|*+?^$.])")
QUANT = re.compile(r"\{(\d+)(?:,(\d*))?\}|\*|\+|\?")


def pattern_hole(pattern: str, path: str, out: Layout, tok, sets: TokenSets) -> None:
    """A pattern made of characters and classes with counts (^[a-z]{3}-\\d{2,4}$): one position a
    character, each taking the one-character tokens of its class; a variable count takes its least
    (one for + and for *), so every filling matches."""
    body = pattern[1:] if pattern.startswith("^") else pattern
    body = body[:-1] if body.endswith("$") and not body.endswith("\\$") else body
    positions, i = [], 0
    while i < len(body):
        m = PATTERN_ATOM.match(body, i)
        if not m:
            raise SchemaError(f"{path}: pattern {pattern!r} uses what this cannot guarantee at {body[i:][:10]!r} "
                              "(supported: characters, classes [..], \\d \\w \\s ., and counts {m} {m,n} * + ?)")
        atom, i = m.group(0), m.end()
        q = QUANT.match(body, i)
        count = 1
        if q:
            i = q.end()
            count = int(q.group(1)) if q.group(1) is not None else {"*": 1, "+": 1, "?": 0}[q.group(0)]
        positions += [class_of(atom, m)] * count
    ids = [sets.one_char(p) for p in positions]
    if not all(ids):
        raise SchemaError(f"{path}: pattern {pattern!r} needs a character the tokenizer has no one-character token for")
    rx = re.compile(pattern)
    out.hole(tok, path, ids, lambda t: bool(rx.search(tok.decode(t))))


def class_of(atom: str, m) -> object:
    """The characters an atom of a pattern matches, as a predicate: printable ASCII only, where
    every regex dialect agrees (Python's \\d also takes '٣', ECMAScript's does not)."""
    if m.group(2) is not None:  # [...]
        rx = re.compile(f"[{'^' if m.group(1) == '^' else ''}{m.group(2)}]")
    else:
        literal = re.escape(m.group(3) or m.group(4) or "")
        rx = re.compile("[ ]" if atom == "\\s" else atom if atom in ("\\d", "\\w", ".") else literal)
    return lambda c: " " <= c <= "~" and bool(rx.fullmatch(c))


def check_schema(schema, path: str = "$") -> None:
    """check_keywords over the whole schema, every anyOf branch included."""
    check_keywords(schema, path)
    for i, sub in enumerate(schema.get("anyOf") or []):
        check_schema(sub, f"{path}.anyOf[{i}]")
    for key, sub in (schema.get("properties") or {}).items():
        check_schema(sub, f"{path}.{key}")
    for name in ("items", "additionalProperties"):
        if isinstance(schema.get(name), dict):
            check_schema(schema[name], f"{path}.{name}")


# --- Validation: the schema judges ---------------------------------------------------------------

def validate(x, schema: dict, path: str = "$") -> str | None:
    """None if x satisfies the schema (its supported keywords), else 'path: what is wrong'."""
    if "const" in schema and x != schema["const"]:
        return f"{path}: is not {json.dumps(schema['const'])}"
    if "enum" in schema and not any(x == v and (type(x) is type(v) or is_type(x, "number") and is_type(v, "number"))
                                    for v in schema["enum"]):
        return f"{path}: is not one of the enum"
    if "anyOf" in schema:
        errors = [validate(x, s, f"{path}.anyOf[{i}]") for i, s in enumerate(schema["anyOf"])]
        if all(errors):
            return errors[0]
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds] if kinds else []
    if kinds and not any(is_type(x, k) for k in kinds):
        return f"{path}: is not of type {' or '.join(kinds)}"
    if isinstance(x, str):
        if not schema.get("minLength", 0) <= len(x) <= schema.get("maxLength", len(x)):
            return f"{path}: has {len(x)} characters"
        if "pattern" in schema and not re.search(schema["pattern"], x):
            return f"{path}: does not match {schema['pattern']}"
    if is_type(x, "number"):
        for name, ok in (("minimum", lambda v: x >= v), ("maximum", lambda v: x <= v),
                         ("exclusiveMinimum", lambda v: x > v), ("exclusiveMaximum", lambda v: x < v)):
            if schema.get(name) is not None and not ok(schema[name]):
                return f"{path}: {x} is outside {name} {schema[name]}"
    if isinstance(x, list):
        if not schema.get("minItems", 0) <= len(x) <= schema.get("maxItems", len(x)):
            return f"{path}: has {len(x)} items"
        for i, item in enumerate(x):
            if isinstance(schema.get("items"), dict) and (e := validate(item, schema["items"], f"{path}[{i}]")):
                return e
    if isinstance(x, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties", {})
        for key in schema.get("required", []):
            if key not in x:
                return f"{path}: lacks {key}"
        for key, v in x.items():
            sub = props.get(key, extra)
            if sub is False:
                return f"{path}: may not have {key}"
            if isinstance(sub, dict) and (e := validate(v, sub, f"{path}.{key}")):
                return e
    return None


def is_type(x, kind: str) -> bool:
    """Whether a parsed JSON value is of a JSON Schema type (1.0 is an integer, True is not)."""
    if kind == "integer":
        return isinstance(x, int) and not isinstance(x, bool) or isinstance(x, float) and x.is_integer()
    if kind == "number":
        return isinstance(x, (int, float)) and not isinstance(x, bool)
    return isinstance(x, {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}[kind])
