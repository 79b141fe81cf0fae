"""schema.py and the reading of typed canvases: every keyword the layouts take, in a schema that uses
it, reads back valid from any filling of its canvas (random tokens in every free position); formats
meet the strict checkers; what cannot be met is refused by name; the judge is jsonschema's verdict."""

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch

from conftest import random_fillings
from generate import load
from structured import SchemaError, build, check_schema, token_sets, validate

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def code():
    return load(HERE / "weights-code", "cpu", torch.float32)


# each keyword, in a schema that uses it, with a value the layout must never produce (a random filling
# of every free position must still read back valid)
KEYWORDS = {
    "$ref/$defs": {"$defs": {"p": {"type": "integer", "minimum": 5, "maximum": 9}}, "type": "array", "items": {"$ref": "#/$defs/p"},
                   "minItems": 2},
    "definitions + pointer": {"definitions": {"a": {"type": "object", "properties": {"b": {"$ref": "#/definitions/b"}},
                                                    "required": ["b"]}, "b": {"enum": ["x", "y z"]}}, "$ref": "#/definitions/a"},
    "recursive $ref": {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {
        "type": "array", "items": {"$ref": "#/$defs/node"}}}, "required": ["v"]}}, "$ref": "#/$defs/node"},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                        {"properties": {"a": {"minimum": 10, "maximum": 12}, "b": {"type": "string"}}, "required": ["b"]}]},
    "oneOf": {"oneOf": [{"type": "string", "maxLength": 3}, {"type": "integer", "minimum": 100}, {"type": "null"}]},
    "anyOf": {"anyOf": [{"type": "boolean"}, {"type": "array", "items": {"type": "integer"}, "maxItems": 2}]},
    "not": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "not": {"required": ["zz"]}},
    "if/then/else": {"type": "object", "properties": {"kind": {"enum": ["a", "b"]}, "n": {"type": "integer"}},
                     "required": ["kind", "n"], "if": {"properties": {"kind": {"const": "a"}}},
                     "then": {"properties": {"n": {"minimum": 50, "maximum": 60}}}, "else": {"properties": {"n": {"maximum": 0}}}},
    "const": {"type": "object", "properties": {"v": {"const": {"deep": [1, "two"]}}}, "required": ["v"]},
    "enum of any values": {"enum": [None, 3.5, [1, 2], {"k": "v"}, "text"]},
    "type list": {"type": ["integer", "string", "null"], "minimum": 3, "maxLength": 2},
    "format": {"type": "object", "properties": {f: {"type": "string", "format": f} for f in
                                                ("date-time", "date", "time", "email", "uri", "uri-reference", "uuid",
                                                 "ipv4", "ipv6", "hostname")}, "required": ["date-time", "date", "time",
                                                                                           "email", "uri", "uri-reference",
                                                                                           "uuid", "ipv4", "ipv6", "hostname"]},
    "pattern with groups": {"type": "string", "pattern": r"^(ab|cd)-\d{2,4}(\.[A-Z]+)?$"},
    "number": {"type": "number", "minimum": -2.5, "maximum": 7.25, "multipleOf": 0.25},
    "exclusive bounds (draft 4)": {"$schema": "http://json-schema.org/draft-04/schema#", "type": "integer", "minimum": 3,
                                   "exclusiveMinimum": True, "maximum": 5, "exclusiveMaximum": True},
    "additionalProperties": {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": False,
                             "required": ["a"]},
    "patternProperties + minProperties": {"type": "object", "patternProperties": {"^x-[a-z]+$": {"type": "integer"}},
                                          "additionalProperties": False, "minProperties": 2},
    "propertyNames": {"type": "object", "propertyNames": {"pattern": "^[a-z]{3}$"}, "minProperties": 1},
    "min/maxProperties": {"type": "object", "properties": {k: {"type": "integer"} for k in "abcde"}, "minProperties": 3,
                          "maxProperties": 4},
    "dependentRequired": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                          "dependentRequired": {"a": ["b"]}},
    "dependencies (draft 7)": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                               "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "dependencies": {"a": ["b"]}},
    "min/maxItems": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 3},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False,
                    "minItems": 2},
    "tuple items (draft 7)": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "array",
                              "items": [{"type": "integer"}, {"const": "x"}], "additionalItems": False, "minItems": 2},
    "uniqueItems": {"type": "array", "items": {"enum": [1, 2, 3]}, "uniqueItems": True, "minItems": 2},
    "contains": {"type": "array", "items": {"type": "integer"}, "contains": {"minimum": 90, "maximum": 95}, "minItems": 1},
    "string lengths": {"type": "string", "minLength": 5, "maxLength": 7},
    "annotations and unknown keywords": {"type": "string", "title": "t", "x-kubernetes-int-or-string": True,
                                         "javaName": "X", "example": "e", "format": "a-format-nobody-knows", "id": "s"},
}


@pytest.mark.parametrize("name", KEYWORDS)
def test_every_keyword_reads_back_valid_from_any_filling(code, name):
    _, tok = code
    schema = KEYWORDS[name]
    lay = build(schema, tok, token_sets(tok, 8192))
    cls = jsonschema.validators.validator_for(schema)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    values = []
    for tokens in random_fillings(lay, 40):
        value, _ = lay.read(tokens)
        assert validator.is_valid(value), (name, value, [e.message for e in validator.iter_errors(value)])
        values.append(json.dumps(value, sort_keys=True))
    if name not in ("const", "exclusive bounds (draft 4)"):
        assert len(set(values)) > 1, name  # the fillings choose: not one fixed value


def test_formats_meet_the_strict_checkers():
    """What each format's pattern writes passes the strictest checks there are (RFC 3339 dates and
    times, RFC 3986 URIs, ...), whatever the model wrote into it."""
    import datetime
    import ipaddress
    import uuid
    from schema import FORMATS, match
    for hint in ("", "zzzz", "2024-13-45T99:99:99", "not an email @@"):
        datetime.datetime.fromisoformat(match(FORMATS["date-time"], hint).replace("Z", "+00:00"))
        datetime.date.fromisoformat(match(FORMATS["date"], hint))
        ipaddress.IPv4Address(match(FORMATS["ipv4"], hint))
        ipaddress.IPv6Address(match(FORMATS["ipv6"], hint))
        uuid.UUID(match(FORMATS["uuid"], hint))
        assert re.fullmatch(r"[^@\s]+@[^@\s]+\.[a-z]+", match(FORMATS["email"], hint))


@pytest.mark.parametrize("schema,message", [
    ({"type": "string", "pattern": r"^(a)\1$"}, "back-reference"), ({"$ref": "https://example.com/s.json"}, "outside"),
    ({"$ref": "#/$defs/missing"}, "names nothing"), ({"type": "integer", "minimum": 5, "maximum": 2}, "no whole number"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength 5 is above maxLength 2"),
    ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems 3 is above maxItems 1"),
    ({"type": "object", "required": ["a"], "additionalProperties": False}, "additionalProperties is false"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "no value is both"),
    ({"type": "date"}, "not valid")])
def test_schemas_that_cannot_be_filled_are_refused(code, schema, message):
    _, tok = code
    with pytest.raises(SchemaError, match=re.escape(message)):
        check_schema(schema)
        build(schema, tok, token_sets(tok, 8192))


def test_the_judge_is_jsonschema():
    """validate() is the jsonschema package's verdict for the schema's draft (the JSON Schema Test
    Suite is that package's own test suite): a draft-4 boolean exclusiveMinimum, a oneOf matched twice."""
    d4 = {"$schema": "http://json-schema.org/draft-04/schema#", "minimum": 3, "exclusiveMinimum": True}
    assert validate(3, d4) is not None and validate(4, d4) is None
    one = {"oneOf": [{"type": "integer"}, {"minimum": 2}]}
    assert validate(5, one) is not None and validate(1, one) is None and validate(2.5, one) is None
