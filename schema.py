"""JSON Schema as typed canvases read it: each subschema seen with its references followed, its allOf
merged, its annotations and unknown keywords dropped (as the specification says to ignore them), its
formats turned into patterns; strings made to match a pattern; and the judge of a finished value.

  Schema(root).view(sub, path)  the constraining keywords of a subschema, as one dict:
      $ref        followed (a JSON pointer into the root: #, #/definitions/.., #/$defs/..), its
                  siblings merged in; a recursive one to a depth bound (MAX_DEPTH)
      allOf       merged into one (properties by name, bounds the tightest, required the union)
      if/then/else  anyOf [if + then, else]  (if + then always satisfies the three)
      oneOf, anyOf  "unions": [(kind, branches)], one branch of each taken and merged in (the judge
                  checks oneOf's "exactly one")
      format      date-time, date, time, email, uri, uri-reference, url, uuid, ipv4, ipv6, hostname,
                  ... as patterns every checker accepts; an unknown format is an annotation
      draft 4     exclusiveMinimum / exclusiveMaximum as booleans beside minimum / maximum
  A keyword that constrains and cannot be met is refused (SchemaError naming it and its path):
  remote references, a pattern with back-references or lookarounds.

  match(pattern, hint)  a string that matches the pattern, taking the hint's characters wherever
                        the pattern allows them (the model's writing, kept where it fits)
  fit_string, snap_number, ...  a value the model wrote, moved into its keywords (lengths and
                        patterns; bounds and multipleOf) as little as it takes
  judge(schema)         the jsonschema package's validator for the schema's draft, with format
                        checks: errors(value) -> [messages]; the one judge of typed canvases

    from schema import Schema, match, judge
    s = Schema({"$defs": {"n": {"type": "integer"}}, "properties": {"a": {"$ref": "#/$defs/n"}}})
    print(s.view(s.root["properties"]["a"], "$.a"))          # {'type': 'integer'}
    print(match(r"^[A-Z]{2}-\\d{3}$", "ab-12x"))             # AA-12x -> 'AA-120' style: always a match
"""

import copy
import json
import math
import re
import re._parser as sre  # the standard library's own regex parser (sre_parse)
from urllib.parse import unquote

from sampler import RequestError

MAX_DEPTH = 6  # a recursive $ref is followed this deep; past it only what is required is written

# keywords that constrain a value (everything else is an annotation or unknown: ignored, as specified)
CONSTRAINTS = {
    "type", "enum", "const", "not", "properties", "required", "additionalProperties",
    "patternProperties", "propertyNames", "minProperties", "maxProperties", "dependentRequired", "dependencies",
    "items", "prefixItems", "additionalItems", "minItems", "maxItems", "uniqueItems", "contains", "minContains",
    "maxContains", "minLength", "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "multipleOf", "patterns", "unions", "else_of"}

# formats as patterns: what each generates is accepted by the strictest checkers (RFC 3339, RFC 3986, ...)
DATE = r"(19[7-9][0-9]|20[0-4][0-9])-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])"
TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,3})?(Z|[+-](0[0-9]|1[0-3]):[0-5][0-9])"
OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
LABEL = r"[a-z]([a-z0-9-]{0,10}[a-z0-9])?"
FORMATS = {
    "date-time": f"^{DATE}T{TIME}$", "date": f"^{DATE}$", "time": f"^{TIME}$",
    "email": rf"^[a-z0-9]([a-z0-9._+-]{{0,14}}[a-z0-9])?@{LABEL}\.[a-z]{{2,6}}$",
    "idn-email": rf"^[a-z0-9]([a-z0-9._+-]{{0,14}}[a-z0-9])?@{LABEL}\.[a-z]{{2,6}}$",
    "uri": rf"^https?://{LABEL}(\.{LABEL})*\.[a-z]{{2,6}}(/[a-zA-Z0-9._~-]{{1,12}}){{0,3}}$",
    "url": rf"^https?://{LABEL}(\.{LABEL})*\.[a-z]{{2,6}}(/[a-zA-Z0-9._~-]{{1,12}}){{0,3}}$",
    "iri": rf"^https?://{LABEL}(\.{LABEL})*\.[a-z]{{2,6}}(/[a-zA-Z0-9._~-]{{1,12}}){{0,3}}$",
    "uri-reference": rf"^(https?://{LABEL}\.[a-z]{{2,6}})?(/[a-zA-Z0-9._~-]{{1,12}}){{1,3}}$",
    "iri-reference": rf"^(https?://{LABEL}\.[a-z]{{2,6}})?(/[a-zA-Z0-9._~-]{{1,12}}){{1,3}}$",
    "uri-template": rf"^https?://{LABEL}\.[a-z]{{2,6}}(/[a-zA-Z0-9._~-]{{1,12}}){{0,3}}$",
    "uuid": r"^[0-9a-f]{8}-[0-9a-f]{4}-[1-5][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$",
    "ipv4": rf"^{OCTET}\.{OCTET}\.{OCTET}\.{OCTET}$",
    "ipv6": r"^[0-9a-f]{1,4}(:[0-9a-f]{1,4}){7}$",
    "hostname": rf"^{LABEL}(\.{LABEL}){{0,2}}$", "idn-hostname": rf"^{LABEL}(\.{LABEL}){{0,2}}$",
    "json-pointer": r"^(/[a-zA-Z0-9_]{1,10}){0,4}$", "relative-json-pointer": r"^[0-9](/[a-zA-Z0-9_]{1,10}){0,3}$",
    "regex": r"^[a-z]{1,10}$", "duration": r"^P[1-9][0-9]?D$",
}


class SchemaError(RequestError):
    """A schema this cannot fill as asked: the message names the path and the keyword."""


class Schema:
    """A root schema and its references: view() resolves a subschema into the keywords that matter."""

    def __init__(self, root):
        if not isinstance(root, (dict, bool)):
            raise SchemaError(f"$: a schema must be an object, not {json.dumps(root)[:40]}")
        self.root = {} if root is True else {"not": {}} if root is False else root

    def pointer(self, ref: str, path: str):
        """The subschema a local reference names."""
        if not ref.startswith("#"):
            raise SchemaError(f"{path}: $ref {ref!r} points outside the schema; only references into it are followed")
        node = self.root
        for part in [unquote(p).replace("~1", "/").replace("~0", "~") for p in ref[1:].split("/") if p]:
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                raise SchemaError(f"{path}: $ref {ref!r} names nothing in the schema")
        return node

    def view(self, sub, path: str, depth: int = 0) -> dict:
        """The constraining keywords of sub (a schema or True/False) as one dict, references followed
        and allOf merged; {"not": {}} for False, {} for True."""
        if sub is True or sub is None:
            return {}
        if sub is False:
            return {"not": {}}
        if not isinstance(sub, dict):
            raise SchemaError(f"{path}: a schema must be an object, not {json.dumps(sub)[:40]}")
        out = {k: v for k, v in sub.items() if k in CONSTRAINTS}
        for kind in ("anyOf", "oneOf"):  # branches: one of each union is taken (unions), merged in
            if isinstance(sub.get(kind), list) and sub[kind]:
                out.setdefault("unions", []).append((kind, list(sub[kind])))
            elif kind in sub:
                raise SchemaError(f"{path}: {kind} must be a non-empty list")
        if isinstance(sub.get("$ref"), str):
            if depth > 3 * MAX_DEPTH:
                raise SchemaError(f"{path}: $ref {sub['$ref']!r} refers to itself without end")
            out = merge(self.view(self.pointer(sub["$ref"], path), path, depth + 1), out, path)
        for i, part in enumerate(sub.get("allOf") or []):
            out = merge(out, self.view(part, f"{path}.allOf[{i}]", depth), path)
        if isinstance(sub.get("if"), (dict, bool)) and ("then" in sub or "else" in sub):
            then = {"allOf": [sub["if"], sub.get("then", True)]}  # if + then satisfies all three
            otherwise = {"allOf": [sub.get("else", True)], "else_of": sub["if"]}  # holds only where `if` fails
            out = merge(out, {"unions": [("anyOf", [then, otherwise])]}, path)
        draft4(sub, out)
        fmt = out.pop("format", None)
        if isinstance(fmt, str) and fmt in FORMATS:
            out.setdefault("patterns", []).append(FORMATS[fmt])
        if "pattern" in out:
            out.setdefault("patterns", []).append(out.pop("pattern"))
        for p in out.get("patterns", []):
            check_pattern(p, path)
        return out


def draft4(sub: dict, out: dict) -> None:
    """Draft 4's boolean exclusiveMinimum / exclusiveMaximum, as the numbers later drafts write."""
    for ex, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(sub.get(ex), bool):
            out.pop(ex)
            if sub[ex] and isinstance(sub.get(bound), (int, float)):
                out[ex] = out.pop(bound)


def merge(a: dict, b: dict, path: str) -> dict:
    """allOf of two viewed schemas as one: each keyword the tighter of the two (properties merged by
    name, required and patterns joined, enums intersected); anyOf and oneOf of both kept as allOf's."""
    out = dict(a)
    for k, v in b.items():
        if k not in out:
            out[k] = copy.copy(v)
        elif k == "properties":
            out[k] = {**out[k], **{n: ({"allOf": [out[k][n], s]} if n in out[k] else s) for n, s in v.items()}}
        elif k == "unions":
            out[k] = list(out[k]) + [u for u in v if u not in out[k]]
        elif k in ("required", "patterns"):
            out[k] = list(dict.fromkeys([x for x in list(out[k]) + list(v) if isinstance(x, str)]))
        elif k in ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties"):
            out[k] = max(out[k], v) if all(isinstance(x, (int, float)) for x in (out[k], v)) else v
        elif k in ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties"):
            out[k] = min(out[k], v) if all(isinstance(x, (int, float)) for x in (out[k], v)) else v
        elif k == "type":
            ta, tb = (set(x) if isinstance(x, list) else {x} for x in (out[k], v))
            both = ta & tb | ({"integer"} if "number" in ta and "integer" in tb or "integer" in ta and "number" in tb else set())
            if not both:
                raise SchemaError(f"{path}: allOf asks for type {sorted(ta)} and {sorted(tb)}: no value is both")
            out[k] = sorted(both) if len(both) > 1 else both.pop()
        elif k == "enum":
            out[k] = [x for x in out[k] if x in v]
            if not out[k]:
                raise SchemaError(f"{path}: allOf's enums have no value in common")
        elif k in ("not", "items", "additionalProperties", "contains", "propertyNames", "additionalItems"):
            out[k] = {"allOf": [out[k], v]}
        else:
            out[k] = v
    closed = [x for x in (a, b) if x.get("additionalProperties") is False]
    for x in closed:  # additionalProperties false in one part allows only that part's own keys, whatever the other adds
        own, patterns = set(x.get("properties") or {}), list(x.get("patternProperties") or {})
        keep = {k: s for k, s in (out.get("properties") or {}).items()
                if k in own or any(re.search(p, k) for p in patterns)}
        if "properties" in out:
            out["properties"] = keep
        out["additionalProperties"] = False
    return out


# --- Patterns ------------------------------------------------------------------------------------

UNSUPPORTED_OPS = {sre.GROUPREF, sre.ASSERT, sre.ASSERT_NOT, sre.GROUPREF_EXISTS}


def check_pattern(pattern, path: str) -> None:
    """SchemaError for a pattern this cannot always match: not a string, not a regex, or one with
    back-references or lookarounds."""
    if not isinstance(pattern, str):
        raise SchemaError(f"{path}: pattern must be a string")
    try:
        tree = sre.parse(pattern)
    except re.error as e:
        raise SchemaError(f"{path}: pattern {pattern!r} is not a regular expression ({e})") from None

    def walk(items):
        for op, av in items:
            if op in UNSUPPORTED_OPS:
                raise SchemaError(f"{path}: pattern {pattern!r} uses a back-reference or a lookaround, which this "
                                  "cannot guarantee")
            if op == sre.SUBPATTERN:
                walk(av[-1])
            elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, getattr(sre, "POSSESSIVE_REPEAT", None)):
                walk(av[2])
            elif op == sre.BRANCH:
                for b in av[1]:
                    walk(b)
            elif op == sre.ATOMIC_GROUP:
                walk(av)
    walk(tree)


PRINTABLE = [chr(c) for c in range(0x20, 0x7F)]
CATEGORY = {sre.CATEGORY_DIGIT: str.isdigit, sre.CATEGORY_NOT_DIGIT: lambda c: not c.isdigit(),
            sre.CATEGORY_WORD: lambda c: c.isalnum() or c == "_", sre.CATEGORY_NOT_WORD: lambda c: not (c.isalnum() or c == "_"),
            sre.CATEGORY_SPACE: str.isspace, sre.CATEGORY_NOT_SPACE: lambda c: not c.isspace()}


def in_class(c: str, items) -> bool:
    """Whether c is in an IN set of the parser."""
    negate = items and items[0][0] == sre.NEGATE
    hit = False
    for op, av in items[negate:]:
        if op == sre.LITERAL:
            hit |= ord(c) == av
        elif op == sre.RANGE:
            hit |= av[0] <= ord(c) <= av[1]
        elif op == sre.CATEGORY:
            hit |= CATEGORY.get(av, lambda _: False)(c)
    return hit != negate


def accepts(op, av, c: str) -> bool:
    """Whether one-character item (op, av) takes c."""
    if op == sre.LITERAL:
        return ord(c) == av
    if op == sre.NOT_LITERAL:
        return ord(c) != av
    if op == sre.ANY:
        return c != "\n"
    if op == sre.IN:
        return in_class(c, av)
    return False


def first_chars(items) -> set[str] | None:
    """The printable characters a sequence may begin with (None: it may be empty, or anything)."""
    for op, av in items:
        if op in (sre.AT,):
            continue
        if op in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN):
            return {c for c in PRINTABLE if accepts(op, av, c)}
        if op == sre.SUBPATTERN:
            return first_chars(av[-1])
        if op == sre.BRANCH:
            out = set()
            for b in av[1]:
                f = first_chars(b)
                if f is None:
                    return None
                out |= f
            return out
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            return first_chars(av[2]) if av[0] > 0 else None
        return None
    return None


class Guided:
    """A string that matches a parsed pattern, built left to right, taking the hint's next character
    wherever the pattern allows it and the first allowed printable character elsewhere."""

    def __init__(self, hint: str):
        self.hint, self.i, self.out = hint, 0, []

    def next_ok(self, test) -> bool:
        return self.i < len(self.hint) and test(self.hint[self.i])

    def emit_one(self, op, av) -> None:
        if self.next_ok(lambda c: accepts(op, av, c)):
            self.out.append(self.hint[self.i])
            self.i += 1
            return
        if self.i < len(self.hint) and op != sre.LITERAL:
            self.i += 1  # the hint's character did not fit here: skip it
        if op == sre.LITERAL:
            self.out.append(chr(av))
            if self.next_ok(lambda c: ord(c) == av):
                self.i += 1
            return
        choice = next((c for c in "a0A_-. " + "".join(PRINTABLE) if accepts(op, av, c)), None)
        if choice is None:
            raise SchemaError("a pattern has a character class with no printable character")
        self.out.append(choice)

    def walk(self, items) -> None:
        for op, av in items:
            if op in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN):
                self.emit_one(op, av)
            elif op == sre.SUBPATTERN:
                self.walk(av[-1])
            elif op == sre.ATOMIC_GROUP:
                self.walk(av)
            elif op == sre.BRANCH:
                branches = av[1]
                pick = next((b for b in branches if (f := first_chars(b)) and self.next_ok(lambda c, f=f: c in f)),
                            branches[0])
                self.walk(pick)
            elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, getattr(sre, "POSSESSIVE_REPEAT", -1)):
                lo, hi, body = av
                hi = lo + 24 if hi == sre.MAXREPEAT else hi  # an open count: what the hint writes, up to 24 more
                f = first_chars(body)
                for k in range(hi):
                    if k >= lo and not (f and self.next_ok(lambda c: c in f)):
                        break
                    self.walk(body)
            # AT (anchors ^ $ \b): the string is built to match whole, they hold


def match(pattern: str, hint: str) -> str:
    """A string that pattern matches (re.search, as JSON Schema does, and re.fullmatch too), as
    close to the hint as the pattern lets it be."""
    g = Guided(hint)
    g.walk(sre.parse(pattern))
    return "".join(g.out)


def match_all(patterns: list[str], hint: str) -> str:
    """A string that every pattern matches, when one exists near the hint: each pattern's guided
    string is tried against all of them (the first that passes), then the hint itself."""
    tries = [hint] + [match(p, hint) for p in patterns]
    for t in tries:
        if all(re.search(p, t) for p in patterns):
            return t
    return tries[-1]


# --- Values into their keywords: what a typed canvas's reader does with what the model wrote --------

def infer_type(v: dict) -> str:
    """The type a schema without one describes, by its keywords (a string when nothing says)."""
    for kind, words in (("object", ("properties", "required", "additionalProperties", "patternProperties",
                                    "minProperties", "maxProperties", "propertyNames", "dependentRequired")),
                        ("array", ("items", "prefixItems", "minItems", "maxItems", "uniqueItems", "contains")),
                        ("number", ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")),
                        ("string", ("minLength", "maxLength", "patterns"))):
        if any(w in v for w in words):
            return kind
    return "string"


def first_char(v: dict) -> str | None:
    """The first character a value of a branch is written with, when its type fixes it."""
    if "const" in v or "enum" in v or v.get("unions"):
        return None
    kind = v.get("type") or infer_type(v)
    return {"object": "{", "array": "[", "string": '"', "null": "n", "boolean": "t"}.get(kind) if \
        isinstance(kind, str) and kind not in ("integer", "number") else ("0" if kind in ("integer", "number") else None)


NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def to_number(text: str):
    """The number at the start of text (an int when it is whole and written so), or None."""
    m = NUMBER.match(text)
    if not m:
        return None
    s = m.group(0)
    return int(s) if m.group(2) is None and m.group(3) is None else float(s)


def bounds(v: dict, integer: bool, path: str) -> tuple[float, float]:
    """[lo, hi] a number may take, exclusive bounds moved inward (by 1 for integers, a little otherwise)."""
    for name in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"):
        if name in v and (type(v[name]) not in (int, float) or not math.isfinite(v[name])):
            raise SchemaError(f"{path}: {name} must be a number")
    gap = 1 if integer else 1e-6
    los = ([v["minimum"]] if "minimum" in v else []) + ([v["exclusiveMinimum"] + gap] if "exclusiveMinimum" in v else [])
    his = ([v["maximum"]] if "maximum" in v else []) + ([v["exclusiveMaximum"] - gap] if "exclusiveMaximum" in v else [])
    lo, hi = max(los, default=-math.inf), min(his, default=math.inf)
    if integer:
        lo, hi = (math.ceil(lo) if math.isfinite(lo) else lo), (math.floor(hi) if math.isfinite(hi) else hi)
    if lo > hi:
        raise SchemaError(f"{path}: no {'whole ' if integer else ''}number lies between its minimum and maximum")
    return lo, hi


def snap_number(x, lo: float, hi: float, step, integer: bool):
    """x moved into [lo, hi] and onto a multiple of step (the nearest such), whole for integers."""
    if x is None:
        x = 0 if lo <= 0 <= hi else lo if math.isfinite(lo) else hi
    x = min(max(x, lo), hi)
    if integer:
        x = int(round(x))
        x = min(max(x, math.ceil(lo) if math.isfinite(lo) else x), math.floor(hi) if math.isfinite(hi) else x)
    if step:
        k = round(x / step)
        for cand in (k, k + 1, k - 1, math.ceil(lo / step) if math.isfinite(lo) else k):
            y = cand * step
            y = int(round(y)) if integer or float(y).is_integer() and isinstance(step, int) else round(y, 12)
            if lo <= y <= hi and (not integer or float(y).is_integer()):
                return y
        return None
    return x


def fit_string(text: str, lo: int, hi: int | None, patterns: list[str]) -> str | None:
    """text made to match every pattern and to have lo..hi characters (None when that fails)."""
    text = match_all(patterns, text) if patterns else text
    if hi is not None and len(text) > hi:
        text = text[:hi]
        if patterns:
            text = match_all(patterns, text)
    if len(text) < lo:
        pad = (text or "x") * lo
        text = match_all(patterns, pad[:lo]) if patterns else pad[:lo]
    ok = lo <= len(text) <= (hi if hi is not None else len(text)) and all(re.search(p, text) for p in patterns)
    return text if ok else None


def distinct(text: str, taken: set, patterns: list[str]) -> str | None:
    """text, or text with a character more, matching every pattern and not in taken (None: no such key)."""
    for extra in [""] + list("abcdefghijklmnopqrstuvwxyz0123456789"):
        key = match_all(patterns, text + extra) if patterns else text + extra
        if key not in taken and all(re.search(p, key) for p in patterns):
            return key
    return None


# --- The judge ------------------------------------------------------------------------------------

def judge(schema):
    """The jsonschema package's validator for the schema's $schema draft (2020-12 without one), with
    its format checker: an independent implementation of JSON Schema decides every typed canvas."""
    try:
        import jsonschema
    except ImportError:
        raise SchemaError("typed output needs the jsonschema package, its judge: pip install jsonschema") from None
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise SchemaError(f"the schema is not valid {cls.__name__.removesuffix('Validator')}: {e.message}") from None
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def holds(root: dict, sub, value) -> bool:
    """Whether value satisfies a subschema of root (its definitions still reachable by pointer)."""
    import jsonschema
    if isinstance(sub, bool):
        return sub
    defs = {k: root[k] for k in ("$defs", "definitions") if k in root and k not in sub}
    try:
        return jsonschema.Draft202012Validator({**sub, **defs}).is_valid(value)
    except jsonschema.exceptions.ReferenceResolutionError:
        return True  # cannot tell: taken as holding, so the branch that is always valid is read


def errors(validator, value) -> list[str]:
    """The judge's complaints about a value, each naming its path ($.a[0].b)."""
    out = []
    for e in validator.iter_errors(value):
        where = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path)
        out.append(f"{where}: {e.message[:200]}")
    return out
