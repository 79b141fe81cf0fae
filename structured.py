"""Typed canvases: a JSON Schema as a canvas on which the model writes a value, and the value read
back from it valid. Filling such a canvas, checking it and best-of-N are canvas editing
(editing.fill_json); what the keywords mean, references and formats included, is schema.py's.

The canvas (build -> Layout): the skeleton is pinned (braces, keys, colons, quotes, constants); the
rest are positions restricted to the tokens their place allows (Allowed, from the tokenizer's own
vocabulary: TokenSets), on which the model decides, by the tokens it writes:
  string    after the opening quote up to n positions of string tokens or a quote: the first quote
            ends it (n: what maxLength allows, else a budget the caller sets); then a pinned quote
  number    up to w positions of the characters of a number (-0123456789, and .eE+ when not an
            integer) or a space: the first space ends it
  enum, const, boolean   options that are one token each: one position; otherwise each position
            takes what some option has there, and the nearest option is read
  array     minItems items, then up to a budget more, each after a decision position: "," (one
            more item) or a space (the end)
  object    its required properties; each optional one after a decision position: "," (present)
            or a space (absent); extra keys (patternProperties, additionalProperties) up to
            minProperties
  anyOf, oneOf, if/then/else, a list of types   a decision position taking one marker per branch
            (the branch's first character when they all differ, else its number), then the
            layout of every branch: the model's marker picks the one read
Reading back (Layout.read): a string is cut at its quote, then made to match its patterns (formats
included) and lengths; a number parsed, moved into its bounds and onto its multipleOf; items and
properties counted against their bounds, dependencies and uniqueness. So the value is valid by
construction for the keywords it lays out, and the judge (schema.judge: the jsonschema package)
checks it whole; a sample it rejects is drawn again (editing.fill_typed). Every snap is counted.

    from tokenizer import Tokenizer; from structured import build, token_sets
    tok = Tokenizer("weights-code/tokenizer.json")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 90}}, "required": ["n"]}
    layout = build(schema, tok, token_sets(tok, 8192))
    print("".join("_" if t is None else tok.decode([t]) for t in layout.tokens))
"""

import json
import math
import re
from dataclasses import dataclass, field

import torch

from sampler import in_canvas
from schema import (MAX_DEPTH, Schema, SchemaError, bounds, distinct, errors, first_char, fit_string, holds, infer_type,
                    judge, snap_number, to_number)

__all__ = ["Allowed", "Budget", "Layout", "SchemaError", "TokenSets", "build", "check_schema", "token_sets", "validate"]


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
        for c in ' ",0123456789-':
            if c not in self.chars:
                raise SchemaError(f"the tokenizer has no token for {c!r}: a typed canvas needs one")
        self.space, self.quote, self.comma = self.chars[" "][0], self.chars['"'][0], self.chars[","][0]
        self.by_length: dict[int, list[int]] = {}
        for i in self.string:
            self.by_length.setdefault(len(self.texts[i]), []).append(i)
        self.made: dict = {}

    def cached(self, key, make) -> list[int]:
        """A sorted set of token ids made once per key (the same list object every time)."""
        if key not in self.made:
            self.made[key] = sorted(set(make()))
        return self.made[key]

    def string_of_length(self, shortest: int, longest: int) -> list[int]:
        """String tokens of shortest..longest characters."""
        return [i for n, ids in self.by_length.items() if shortest <= n <= longest for i in ids]

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
class Budget:
    """How much canvas a value may take where the schema sets no bound: positions of a string, items
    beyond minItems, how deep optional properties are written, branches laid out."""
    string: int = 8
    number: int = 10
    items: int = 3
    optional_depth: int = 4
    branches: int = 4
    extra_keys: int = 2

    def smaller(self) -> "Budget":
        return Budget(max(2, self.string // 2), 8, max(0, self.items - 1), max(0, self.optional_depth - 1),
                      max(1, self.branches - 1), max(1, self.extra_keys - 1))


@dataclass
class Layout:
    """A canvas for a schema: a pinned token or None (a free position) at each offset, the token set
    of each free position, and how to read the value back (read)."""
    tokens: list = field(default_factory=list)
    free: dict = field(default_factory=dict)  # offset -> index into sets
    sets: list = field(default_factory=list)
    pending: str = ""  # pinned text not yet tokenized
    reader: object = None  # (tokens, snaps) -> value
    schema: dict | None = None
    index: dict = field(default_factory=dict)  # a set's key -> its index in sets

    def pin(self, text: str) -> None:  # tokenized with the pinned text that follows it (flush)
        self.pending += text

    def flush(self, tok) -> None:
        if self.pending:
            self.tokens += tok.encode(self.pending)
            self.pending = ""

    def positions(self, tok, position_sets: list[list[int]]) -> int:
        """Free positions with these token sets (TokenSets.cached lists, or small ones), after the
        pinned text so far: their first offset."""
        self.flush(tok)
        start = len(self.tokens)
        for ids in position_sets:
            big = isinstance(ids, list) and len(ids) > 64  # TokenSets.cached: known by identity
            key = id(ids) if big else tuple(sorted(set(ids)))
            if key not in self.index:
                self.index[key] = len(self.sets)
                self.sets.append(ids if big else list(key))
            self.free[len(self.tokens)] = self.index[key]
            self.tokens.append(None)
        return start

    def read(self, tokens: list[int]) -> tuple[object, list[str]]:
        """The value the model wrote on a filled canvas, made valid where it was not; and the paths
        where it had to be (snaps)."""
        snaps: list[str] = []
        return self.reader(tokens, snaps), snaps


def build(schema, tok, sets: TokenSets, budget: Budget | None = None, max_positions: int | None = None) -> Layout:
    """The canvas of a schema, within max_positions (smaller budgets are tried until it fits)."""
    budget = budget or Budget()
    while True:
        out = Layout(schema=schema)
        b = Builder(Schema(schema), tok, sets, out, budget)
        read = b.value(b.schema.root, "$", 0)
        out.flush(tok)
        out.reader = read
        if max_positions is None or len(out.tokens) <= max_positions:
            return out
        if budget == budget.smaller():
            raise SchemaError(f"$: the schema's canvas takes {len(out.tokens)} positions, more than the "
                              f"{max_positions} the model has left")
        budget = budget.smaller()


class Builder:
    """Lays out one schema on a Layout; each method returns the reader of what it laid out."""

    def __init__(self, schema: Schema, tok, sets: TokenSets, out: Layout, budget: Budget):
        self.schema, self.tok, self.sets, self.out, self.budget = schema, tok, sets, out, budget

    def value(self, sub, path: str, depth: int):
        v = self.schema.view(sub, path, depth)
        if depth > 3 * MAX_DEPTH:
            raise SchemaError(f"{path}: the schema requires a value nested deeper than {3 * MAX_DEPTH} levels")
        if "const" in v:
            self.out.pin(json.dumps(v["const"]))
            return lambda tokens, snaps: v["const"]
        if "enum" in v:
            return self.choice(v["enum"], path)
        branches = self.branches(v, path, depth)
        if len(branches) > 1:
            return self.union(branches, path, depth)
        v = branches[0]
        if v.get("unions") or "const" in v or "enum" in v:  # what a branch brought: the next level
            return self.value(v, path, depth)
        kind = v.get("type") or infer_type(v)
        if kind == "null":
            self.out.pin("null")
            return lambda tokens, snaps: None
        if kind == "boolean":
            return self.choice([True, False], path)
        if kind in ("integer", "number"):
            return self.number(v, path, kind == "integer")
        if kind == "string":
            return self.string(v, path)
        if kind == "array":
            return self.array(v, path, depth)
        return self.object(v, path, depth)

    def branches(self, v: dict, path: str, depth: int) -> list[dict]:
        """The alternatives a viewed schema offers at its first union (each branch merged into the
        rest of it), or at its list of types; at most budget.branches, and past the depth bound the
        simplest one, so that a recursion ends."""
        from schema import merge
        unions = v.get("unions") or []
        if unions:
            kind, options = unions[0]
            rest = {k: x for k, x in v.items() if k != "unions"} | ({"unions": unions[1:]} if len(unions) > 1 else {})
            alts = []
            for i, o in enumerate(options):
                try:
                    alts.append(merge(rest, self.schema.view(o, f"{path}.{kind}[{i}]", depth), path))
                except SchemaError:
                    continue
            if not alts:
                raise SchemaError(f"{path}: no branch of its {kind} can hold a value")
        else:
            kinds = v.get("type")
            alts = [dict(v, type=k) for k in kinds] if isinstance(kinds, list) and kinds else [v]
        if depth > MAX_DEPTH:  # deep in a recursion: the simplest branch, so that it ends
            simple = ("null", "boolean", "string", "integer", "number")
            alts.sort(key=lambda a: not isinstance(a.get("type") or infer_type(a), str)
                      or (a.get("type") or infer_type(a)) not in simple)
            return alts[:1]
        return alts[: self.budget.branches]

    def union(self, branches: list[dict], path: str, depth: int):
        """A decision position taking one marker per branch, then every branch's layout."""
        firsts = [first_char(b) for b in branches]
        markers = firsts if None not in firsts and len(set(firsts)) == len(firsts) else \
            [str(i) for i in range(len(branches))]
        marker_ids = [self.sets.chars[m][0] if m in self.sets.chars else None for m in markers]
        if None in marker_ids:
            markers, marker_ids = [str(i) for i in range(len(branches))], [self.sets.chars[str(i)][0] for i in range(len(branches))]
        at = self.out.positions(self.tok, [marker_ids])
        readers = []
        for i, b in enumerate(branches):
            self.out.pin(" ")
            readers.append(self.value(b, f"{path}<{i}>", depth))

        def read(tokens, snaps):
            pick = marker_ids.index(tokens[at]) if tokens[at] in marker_ids else 0
            value = readers[pick](tokens, snaps)
            guard = branches[pick].get("else_of")
            if guard is not None and holds(self.schema.root, guard, value):  # else, where if holds: then's
                snaps.append(path)
                return readers[0](tokens, snaps)
            return value
        return read

    def choice(self, values: list, path: str):
        """One of the values, the nearest the model wrote."""
        options = [self.tok.encode(json.dumps(x)) for x in values]
        if all(len(o) == 1 for o in options):
            at = self.out.positions(self.tok, [[o[0] for o in options]])
            return lambda tokens, snaps: values[[o[0] for o in options].index(tokens[at])] \
                if tokens[at] in [o[0] for o in options] else values[0]
        width = max(map(len, options))
        position_sets = [{o[j] for o in options if len(o) > j} | {self.sets.space} for j in range(width)]
        at = self.out.positions(self.tok, position_sets)

        def read(tokens, snaps):
            got = tokens[at: at + width]
            best = max(range(len(values)), key=lambda i: (sum(a == b for a, b in zip(options[i], got)),
                                                          -abs(len(options[i]) - width)))
            if got[: len(options[best])] != options[best]:
                snaps.append(path)
            return values[best]
        return read

    def number(self, v: dict, path: str, integer: bool):
        """Up to w characters of a number, a space ending it; read into the bounds and multipleOf."""
        lo, hi = bounds(v, integer, path)
        finite = [abs(x) for x in (lo, hi) if math.isfinite(x)]
        digits = len(str(int(max(finite)))) if len(finite) == 2 else self.budget.number
        width = max(1, min(self.budget.number, digits + (lo < 0) + (0 if integer else 3)))
        chars = "0123456789" + ("-" if lo < 0 else "") + ("" if integer else ".")
        ids = self.sets.cached(("number", chars), lambda: self.sets.one_char(chars) + [self.sets.space])
        at = self.out.positions(self.tok, [ids] * max(width, 1))
        step = v.get("multipleOf")

        def read(tokens, snaps):
            text = self.tok.decode(tokens[at: at + width]).split(" ")[0]
            x = to_number(text)
            y = snap_number(x, lo, hi, step, integer)
            if y is None:
                raise SchemaError(f"{path}: no number lies in its bounds on its multipleOf")
            if x is None or y != x:
                snaps.append(path)
            return y
        return read

    def string(self, v: dict, path: str, quoted: bool = True):
        """Up to n string tokens, the first quote ending them; read into the patterns and lengths."""
        lo, hi = v.get("minLength", 0), v.get("maxLength")
        if hi is not None and lo > hi:
            raise SchemaError(f"{path}: minLength {lo} is above maxLength {hi}")
        patterns = v.get("patterns", [])
        n = min(self.budget.string, hi) if hi is not None else self.budget.string
        longest = max(hi // max(n, 1), 1) if hi is not None else 10 ** 9
        if patterns:  # a pattern: one character a position, of the characters it may take
            ids = self.sets.cached("ascii", lambda: self.sets.one_char(lambda c: " " <= c <= "~") + [self.sets.quote])
            n = min(max(n, 12), 40)
        else:
            ids = self.sets.cached(("string", longest), lambda: self.sets.string_of_length(1, longest) + [self.sets.quote])
        self.out.pin('"' if quoted else "")
        at = self.out.positions(self.tok, [ids] * n) if n else len(self.out.tokens)
        self.out.pin('"' if quoted else "")

        def read(tokens, snaps):
            got = tokens[at: at + n]
            if self.sets.quote in got:
                got = got[: got.index(self.sets.quote)]
            text = self.tok.decode(got)
            fixed = fit_string(text, lo, hi, patterns)
            if fixed is None:
                raise SchemaError(f"{path}: no string matches its pattern within minLength {lo} and maxLength {hi}")
            if fixed != text:
                snaps.append(path)
            return fixed
        return read

    def decision(self) -> int:
        """A position that takes "," (yes) or a space (no)."""
        return self.out.positions(self.tok, [[self.sets.comma, self.sets.space]])

    def array(self, v: dict, path: str, depth: int):
        """minItems items, then optional ones after decision positions; tuples by position."""
        prefix = v.get("prefixItems") or (v["items"] if isinstance(v.get("items"), list) else [])
        rest = v.get("items") if isinstance(v.get("items"), (dict, bool)) else v.get("additionalItems", {})
        lo, hi = v.get("minItems", 0), v.get("maxItems")
        if hi is not None and lo > hi:
            raise SchemaError(f"{path}: minItems {lo} is above maxItems {hi}")
        if rest is False:
            hi = len(prefix) if hi is None else min(hi, len(prefix))
        most = lo + (self.budget.items if depth <= MAX_DEPTH else 0)
        most = min(most, hi) if hi is not None else most
        contains = v.get("contains")
        need = max(v.get("minContains", 1), 0) if contains is not None else 0
        self.out.pin("[")
        items = []
        for i in range(most):
            sub = prefix[i] if i < len(prefix) else rest
            if i < need:
                sub = {"allOf": [sub if sub is not None else {}, contains]}
            at = self.decision() if i >= lo else None
            items.append((at, self.value(sub if sub is not None else {}, f"{path}[{i}]", depth + 1)))
        self.out.pin("]")
        unique = v.get("uniqueItems") is True
        item_schemas = [prefix[i] if i < len(prefix) else rest for i in range(len(items))]

        def read(tokens, snaps):
            out = []
            for at, item in items:
                if at is not None and tokens[at] != self.sets.comma:
                    break
                out.append(item(tokens, snaps))
            if unique:
                out = self.unique(out, lo, item_schemas, path, snaps)
            return out
        return read

    def unique(self, items: list, lo: int, schemas: list, path: str, snaps: list) -> list:
        """Items without repeats: a repeat is dropped while minItems allows, else changed into a value
        its item schema still takes (another option of an enum, a digit more, a number moved)."""
        out, seen = [], set()
        for i, x in enumerate(items):
            key = json.dumps(x, sort_keys=True)
            if key in seen:
                snaps.append(path)
                if len(out) + (len(items) - i - 1) >= lo:
                    continue
                view = self.schema.view(schemas[i] if schemas[i] is not None else {}, path, 0)
                tries = list(view.get("enum", [])) + ([x + c for c in "0123456789abcdefghij"] if isinstance(x, str) else
                                                      [x + d for d in (1, -1, 2, -2, 3, -3)] if isinstance(x, (int, float))
                                                      and not isinstance(x, bool) else [])
                x = next((t for t in tries if json.dumps(t, sort_keys=True) not in seen
                          and holds(self.schema.root, schemas[i] if schemas[i] is not None else {}, t)), x)
                key = json.dumps(x, sort_keys=True)
            seen.add(key)
            out.append(x)
        return out

    def object(self, v: dict, path: str, depth: int):
        """Required properties, then optional ones after decision positions, then extra keys."""
        props = v.get("properties", {}) if isinstance(v.get("properties"), dict) else {}
        required = [k for k in v.get("required", []) if isinstance(k, str)]
        extra = v.get("additionalProperties", {})
        pattern_props = v.get("patternProperties", {}) if isinstance(v.get("patternProperties"), dict) else {}
        deps = {k: d for k, d in {**v.get("dependencies", {}), **v.get("dependentRequired", {})}.items()
                if isinstance(d, list)}

        def schema_of(key):
            if key in props:
                return props[key]
            for p, s in pattern_props.items():
                if re.search(p, key):
                    return s
            if extra is False:
                raise SchemaError(f"{path}: {key} is required but additionalProperties is false")
            return extra if isinstance(extra, dict) else {}
        never = {k for k, s in props.items() if s is False}  # a property named only to forbid it
        for k in never & set(required):
            raise SchemaError(f"{path}: {k} is required and forbidden (its schema is false)")
        order = [k for k in dict.fromkeys(required + list(props)) if k not in never]
        optional_ok = depth <= self.budget.optional_depth and depth <= MAX_DEPTH
        most = v.get("maxProperties")
        self.out.pin("{")
        fields = []
        for key in order:
            if key not in required and not optional_ok:
                continue
            at = self.decision() if key not in required else None  # "," present, a space absent
            self.out.pin((", " if fields and at is None else "") + json.dumps(key) + ": ")
            fields.append((key, at, self.value(schema_of(key), f"{path}.{key}", depth + 1)))
        n_extra = max(0, v.get("minProperties", 0) - len(order))
        n_extra = min(n_extra, 16) if extra is not False or pattern_props else 0
        extras = []
        key_pattern = next(iter(pattern_props), None)
        names = self.schema.view(v.get("propertyNames", {}), f"{path}.propertyNames", depth)
        key_patterns = ([key_pattern] if key_pattern else []) + names.get("patterns", [])
        for i in range(n_extra):
            self.out.pin(', "' if fields or i else '"')
            key_read = self.string({"patterns": key_patterns, "minLength": max(1, names.get("minLength", 1)),
                                    "maxLength": names.get("maxLength")}, f"{path}.<key{i}>", quoted=False)
            self.out.pin('": ')
            sub = pattern_props[key_pattern] if key_pattern else extra if isinstance(extra, dict) else {}
            extras.append((key_read, self.value(sub, f"{path}.<value{i}>", depth + 1)))
        self.out.pin("}")
        lo_props = v.get("minProperties", 0)

        def read(tokens, snaps):
            present = [(k, r) for k, at, r in fields if at is None or tokens[at] == self.sets.comma]
            keys = {k for k, _ in present}
            for k, _, r in fields:  # a present key's dependencies, and enough keys for minProperties
                if k not in keys and (any(k in deps.get(p, []) for p in keys) or len(keys) < lo_props - len(extras)):
                    present.append((k, r))
                    keys.add(k)
                    snaps.append(f"{path}.{k}")
            obj = {k: r(tokens, snaps) for k, r in present}
            for key_read, value_read in extras:
                key = distinct(key_read(tokens, snaps), set(obj), key_patterns)
                if key is not None:
                    obj[key] = value_read(tokens, snaps)
            if most is not None and len(obj) > most:
                for k in [k for k in reversed(list(obj)) if k not in required][: len(obj) - most]:
                    del obj[k]
                snaps.append(path)
            return obj
        return read


# --- The judge ------------------------------------------------------------------------------------

def check_schema(schema) -> None:
    """SchemaError for a schema that is not valid JSON Schema (the judge's own check) or that the
    judge cannot run (jsonschema not installed)."""
    judge(schema)


def validate(x, schema) -> str | None:
    """None if x satisfies the schema (the judge: the jsonschema package), else 'path: what is wrong'."""
    found = errors(judge(schema), x)
    return found[0] if found else None
