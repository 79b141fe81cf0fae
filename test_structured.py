"""Typed canvases (structured.py, editing.fill_json, the sampler's restriction): the token
sets a tokenizer's vocabulary gives, the restriction inside the sampler step, schemas laid out,
filled, repaired and refused, a suite of schemas whose every output the jsonschema library
accepts, and the command line, Python and server interfaces."""

import json
import math
import re
import shutil
import string
import subprocess
import sys

import jsonschema
import pytest
import torch

import structured
import sudoku
from conftest import CODE_TEMPLATE, GEMMA4_TOKENIZER, HERE, Server, needs_gemma4
from generate import generate_json, load
from sampler import DenoiseState, GenerationSettings, SamplerSettings, block_diffusion, entropy, restrict, sampler_step
from streams import RandomStreams
from editing import Filled, fill_json, fill_typed, finish_typed
from structured import Allowed, SchemaError, TokenSets, build, check_schema, token_sets, validate
from tokenizer import ChatFormat, Tokenizer

SUITE = json.loads((HERE / "scripts" / "schema_suite.json").read_text())
SEEDS = [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def code():
    return load(HERE / "weights-code", "cpu", torch.float32)


@pytest.fixture(scope="module")
def gemma(chat_ckpt):
    """A tiny random checkpoint with the Gemma 4 tokenizer (vocab 262,144)."""
    return load(chat_ckpt, "cpu", torch.float32)


def fast(model, steps: int = 12) -> GenerationSettings:
    """The model's settings with fewer steps: validity must not depend on how long it denoises."""
    return model.generation_settings.copy(steps=steps)


# ---------------------------------------------------------------------------------------------
# Token sets from the real vocabulary
# ---------------------------------------------------------------------------------------------

def tokenizer_of(which: str) -> Tokenizer:
    return Tokenizer(GEMMA4_TOKENIZER if which == "gemma4" else HERE / "weights-code" / "tokenizer.json")


@pytest.mark.parametrize("which", ["weights-code", pytest.param("gemma4", marks=needs_gemma4)])
def test_token_sets_follow_the_vocabulary(which):
    tok = tokenizer_of(which)
    V = tok.vocab_size
    sets = TokenSets(tok, V)
    string = set(sets.string)
    # what a string hole takes reads back as itself inside a JSON string, several characters too
    sample = sets.string[:: max(1, len(sets.string) // 3000)]
    assert all(json.loads('"' + sets.texts[i] + '"') == sets.texts[i] for i in sample)
    assert sum(len(sets.texts[i]) >= 4 for i in sets.string) > 100  # byte-level BPE: long tokens
    assert tok.encode(" the")[0] in string
    # tokens with a quote, a backslash, a newline, or a piece of a character are left out
    for bad in ('"', "\\", "\n", "\ufffd"):
        having = [i for i, t in enumerate(sets.texts) if bad in t]
        assert having and not string & set(having), bad
    assert not string & {i for i in range(V) if tok.decode([i]) == ""}  # special tokens
    # one-character tokens by character; concatenations decode to the concatenation
    for d in "0123456789":
        assert sets.one_char(d) and all(tok.decode([i]) == d for i in sets.one_char(d))
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        ids = [sets.string[int(j)] for j in torch.randint(len(sets.string), (4,), generator=g)]
        assert tok.decode(ids) == "".join(sets.texts[i] for i in ids)
    assert tok.decode([sets.space]) == " "


# ---------------------------------------------------------------------------------------------
# The restriction in the sampler step
# ---------------------------------------------------------------------------------------------

def restricted_case():
    torch.manual_seed(0)
    B, C, V = 2, 6, 50
    raw = torch.randn(B, C, V) * 3
    sets = [[1, 2, 3], [10, 20, 30, 40, 49]]
    rows = [{0: 0, 2: 1, 3: 1}, {5: 0}]
    return raw, sets, rows, Allowed(sets, rows).for_canvas(0, B, C, V, "cpu")


def test_restriction_is_a_mask_of_the_logits():
    raw, sets, rows, allowed = restricted_case()
    expected = raw.clone()
    for b, row in enumerate(rows):
        for offset, k in row.items():
            keep = torch.zeros(raw.shape[-1], dtype=torch.bool)
            keep[sets[k]] = True
            expected[b, offset, ~keep] = float("-inf")
    assert torch.equal(restrict(raw.clone(), allowed), expected)  # allowed logits unchanged to the bit
    # offsets of another canvas, or none at all, restrict nothing
    assert Allowed(sets, rows).for_canvas(1, 2, 6, 50, "cpu") is None
    one_for_all = Allowed(sets, [{4: 1}]).for_canvas(0, 2, 6, 50, "cpu")  # one row's map for every row
    assert sorted(one_for_all[1][0][0].tolist()) == [4, 10]


def test_sampler_counts_only_allowed_tokens():
    """Entropy (and so the bound), samples and argmax see the allowed tokens only; pinned
    positions keep their token; unrestricted positions are as without a restriction."""
    raw, sets, rows, allowed = restricted_case()
    B, C, V = raw.shape
    s = SamplerSettings(max_steps=4, entropy_bound=1.0)
    pinned = torch.zeros(B, C, dtype=torch.bool)
    pinned[0, 3] = True  # restricted and pinned: the pin wins
    pin_tokens = torch.full((B, C), 7)
    for trial in range(20):
        state = DenoiseState.start(B, C, V, RandomStreams([trial, trial + 100], "cpu"), 4, allowed=allowed,
                                   pins=(pinned, pin_tokens))
        out = sampler_step(state, raw.clone(), s, torch.float32)
        T = s.t_min + (s.t_max - s.t_min) * (4 / 4)
        for b, row in enumerate(rows):
            for offset, k in row.items():
                if pinned[b, offset]:
                    assert out.argmax[b, offset] == 7 and out.canvas[b, offset] == 7 and out.entropy[b, offset] == 0
                    continue
                logits = raw[b, offset, sets[k]] / T
                assert math.isclose(float(out.entropy[b, offset]), float(entropy(logits[None])), rel_tol=1e-5)
                assert int(out.argmax[b, offset]) == sets[k][int(logits.argmax())]
                if out.accepted[b, offset]:
                    assert int(out.canvas[b, offset]) in sets[k]
        free = torch.ones(B, C, dtype=torch.bool)
        for b, row in enumerate(rows):
            free[b, list(row)] = False
        plain = sampler_step(DenoiseState.start(B, C, V, RandomStreams([trial, trial + 100], "cpu"), 4),
                             raw.clone(), s, torch.float32)
        assert torch.equal(out.entropy[free], plain.entropy[free]) and torch.equal(out.argmax[free], plain.argmax[free])


def test_no_restriction_changes_nothing(code):
    """A set of every token on every position (an add of zeros) gives the very tokens of no
    restriction; so does an Allowed that restricts nothing."""
    model, tok = code
    V, settings = model.config.vocab_size, fast(model).copy(max_new_tokens=40)
    prompts = [tok.encode_raw("def f(x):"), tok.encode_raw("class A:")]
    plain = block_diffusion(model, prompts, settings, seeds=[3, 4])
    everything = Allowed([list(range(V))], [{j: 0 for j in range(40)}])
    assert torch.equal(block_diffusion(model, prompts, settings, seeds=[3, 4], allowed=everything).sequences,
                       plain.sequences)
    assert torch.equal(block_diffusion(model, prompts, settings, seeds=[3, 4], allowed=Allowed([], [{}])).sequences,
                       plain.sequences)


def test_sudoku_cells_take_only_their_own_tokens():
    """allowed= beside pins=, for another structure: every cell of every sample is its own cell's
    token (the bundled 6x6 model, with few steps so that it is unsure)."""
    model, tok = load(HERE / "weights", "cpu", torch.float32)
    shape = sudoku.SHAPES[6]
    puzzle = sudoku.BUILTIN[6]
    settings = model.generation_settings.copy(steps=2, entropy_bound=50.0)
    grids = sudoku.solve_with(model, [puzzle], shape, settings, samples=16, seeds=list(range(16)),
                              allowed=sudoku.cells_allowed(shape))[0]
    assert all(all(1 <= d <= shape.n for d in g) for g in grids)
    assert all(g[i] == d for g in grids for i, d in enumerate(puzzle) if d)


# ---------------------------------------------------------------------------------------------
# Schemas as canvases
# ---------------------------------------------------------------------------------------------

@needs_gemma4
def test_pattern_classes_take_ascii_only():
    """Python's \\d matches every decimal digit and str.isdigit even '²': a pattern's positions take
    printable ASCII only, so every filling matches in any regex dialect."""
    tok = tokenizer_of("gemma4")
    sets = token_sets(tok, tok.vocab_size)
    lay = build({"type": "string", "pattern": "^\\d\\w[^a-z].[x-z]\\.$"}, tok, sets)
    allowed = [{sets.texts[i] for i in lay.sets[k]} for k in lay.holes[0].sets]
    assert allowed[0] == set("0123456789") and allowed[1] == set(string.ascii_letters + string.digits + "_")
    assert all(c.isascii() and c.isprintable() for s in allowed for c in s)
    assert "a" not in allowed[2] and "A" in allowed[2] and allowed[4] == set("xyz") and allowed[5] == {"."}
    assert any("\u0663" == t for t in sets.texts) and any(t == "\u00b2" for t in sets.texts)  # the vocab has them


def test_layout_pins_the_skeleton_and_types_the_holes(code):
    _, tok = code
    sets = token_sets(tok, 8192)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 70},
                                               "s": {"type": "string", "maxLength": 4}, "b": {"type": "boolean"}}}
    lay = build(schema, tok, sets)
    skeleton = "".join("_" if t is None else tok.decode([t]) for t in lay.tokens)
    assert skeleton.startswith('{"n": __, "s": "____", "b": ') and skeleton.endswith("}")
    n, s, b = lay.holes
    assert [h.path for h in lay.holes] == ["$.n", "$.s", "$.b"]
    first, second = (set(lay.sets[k]) for k in n.sets)
    assert {tok.decode([i]) for i in first} == set("123456") and {tok.decode([i]) for i in second} == set("0123456789")
    assert all(len(sets.texts[i]) == 1 for k in s.sets for i in lay.sets[k])  # 4 positions, 4 characters at most


@pytest.mark.parametrize("lo,hi", [(0, 0), (3, 70), (18, 99), (1900, 2100), (0, 1000), (7, 7), (95, 105), (1, 10 ** 6),
                                   (250, 251), (0, 9), (10, 19)])
def test_every_number_a_hole_can_hold_is_in_range(lo, hi):
    prefix, firsts, width = structured.digit_plan(lo, hi)
    numbers = [int(prefix)] if width == 0 else \
        [int(prefix + str(d) + rest) for d in firsts for rest in ([""] if width == 1 else
                                                                   [str(x).zfill(width - 1) for x in (0, 10 ** (width - 1) - 1)])]
    assert numbers and all(lo <= x <= hi for x in numbers)
    assert all(json.loads(str(x)) == x for x in numbers)  # no leading zero


UNSUPPORTED = ["format", "$ref", "$defs", "allOf", "oneOf", "not", "uniqueItems", "multipleOf", "patternProperties",
               "propertyNames", "minProperties", "maxProperties", "contains", "prefixItems", "if", "dependentRequired"]


@pytest.mark.parametrize("keyword", UNSUPPORTED)
def test_unsupported_keywords_are_refused_by_name(keyword):
    schema = {"type": "object", "properties": {"a": {"type": "string", keyword: {}}}}
    with pytest.raises(SchemaError, match=rf"^\$\.a: unsupported keyword {re.escape(keyword)}$"):
        check_schema(schema)
    deep = {"type": "array", "items": {"anyOf": [{"type": "integer"}, {"type": "object", keyword: 1}]}}
    with pytest.raises(SchemaError, match=re.escape(f"$.items.anyOf[1]: unsupported keyword {keyword}")):
        check_schema(deep)


@pytest.mark.parametrize("schema,message", [
    ({"type": "string", "pattern": "^(ab|cd)$"}, "pattern"), ({"type": "date"}, "type 'date' is not supported"),
    ({"type": "integer", "minimum": 5, "maximum": 2}, "no whole number"), ({"enum": []}, "enum must be"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength 5 is above maxLength 2"),
    ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems 3 is above maxItems 1")])
def test_schemas_that_cannot_be_filled_are_refused(code, schema, message):
    _, tok = code
    with pytest.raises(SchemaError, match=re.escape(message)):
        check_schema(schema)
        build(schema, tok, token_sets(tok, 8192))


def test_repair_fixes_a_planted_span_and_keeps_the_rest(code):
    """A hole whose filling fails its check is renoised with every valid span pinned: the planted
    invalid number is replaced by one in range, every other position stays as it was."""
    model, tok = code
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer", "minimum": 18, "maximum": 99},
                                               "city": {"type": "string"}}}
    lay = build(schema, tok, token_sets(tok, 8192))
    prompt = tok.encode_raw("def f(x):")
    (good,) = fill_typed(model, tok, prompt, [lay], fast(model), [0])
    assert good.error is None and good.rounds == 0
    age = lay.holes[1]
    zero = tok.encode("0")[0]
    planted = list(good.tokens)
    planted[age.start: age.start + len(age.sets)] = [zero] * len(age.sets)  # "00": out of range
    assert not age.check(planted[age.start: age.start + len(age.sets)])
    seen = []
    (fixed,) = fill_typed(model, tok, prompt, [lay], fast(model), [0], start=[planted],
                    on_round=lambda r, rows, tokens: seen.append((r, rows, tokens)))
    assert fixed.error is None and fixed.rounds == 1 and [r for r, _, _ in seen] == [1]
    assert 18 <= json.loads(fixed.text)["age"] <= 99
    span = set(range(age.start, age.start + len(age.sets)))
    assert all(fixed.tokens[j] == planted[j] for j in range(len(planted)) if j not in span)


def test_a_choice_that_is_no_option_snaps_to_the_nearest(code):
    model, tok = code
    schema = {"enum": ["needs review", "approve later", 12]}
    lay = build(schema, tok, token_sets(tok, 8192))
    (hole,) = lay.holes
    near = list(hole.options[1])
    near[-1] = token_sets(tok, 8192).space  # "approve later" with its last token gone
    tokens = list(lay.tokens[: hole.start]) + near + [token_sets(tok, 8192).space] * (len(hole.sets) - len(near))
    f = finish_typed(tokens, lay, tok, 0, token_sets(tok, 8192).space)
    assert f.value == "approve later" and f.snapped == ["$"]


# ---------------------------------------------------------------------------------------------
# The suite: every output validates, judged by jsonschema
# ---------------------------------------------------------------------------------------------

def fill_suite(model, tok, prompt: list[int], settings: GenerationSettings) -> list[tuple[int, Filled]]:
    sets = token_sets(tok, model.config.vocab_size)
    out = []
    for k, schema in enumerate(SUITE):
        check_schema(schema)
        layouts = [build(schema, tok, sets, branch=i) for i in range(len(SEEDS))]
        out += [(k, f) for f in fill_typed(model, tok, prompt, layouts, settings, SEEDS)]
    return out


def assert_all_valid(results):
    assert len(SUITE) >= 30 and len(results) == len(SUITE) * len(SEEDS)
    for k, f in results:
        value = json.loads(f.text)
        jsonschema.validate(value, SUITE[k])  # the judge: another implementation of JSON Schema
        assert f.error is None and validate(value, SUITE[k]) is None


def test_suite_validates_on_weights_code(code):
    model, tok = code
    results = fill_suite(model, tok, tok.encode_raw("def f(x):"), fast(model))
    assert_all_valid(results)
    assert len({f.text for _, f in results}) > len(SUITE) * 3  # the samples differ: the model wrote them


@needs_gemma4
def test_suite_validates_on_a_random_gemma4_checkpoint(gemma):
    model, tok = gemma
    prompt = tok.prompt_ids("Describe the record as JSON.")
    assert_all_valid(fill_suite(model, tok, prompt, fast(model, steps=2)))


def test_own_validator_agrees_with_jsonschema():
    """validate() says no exactly where jsonschema does, on values that break each kind of rule."""
    schema = SUITE[31]  # id, email pattern, roles enum list, active; additionalProperties false
    good = {"id": 5, "email": "abcd@xyz.com", "roles": ["dev"], "active": True}
    cases = [good, {**good, "id": 0}, {**good, "id": 2.5}, {**good, "email": "ab@x.com"}, {**good, "roles": []},
             {**good, "roles": ["dev", "root"]}, {**good, "active": 1}, {**good, "extra": 1},
             {k: v for k, v in good.items() if k != "email"}, {**good, "roles": ["dev", "dev", "admin"]}]
    for x in cases:
        ok = jsonschema.Draft202012Validator(schema).is_valid(x)
        assert (validate(x, schema) is None) == ok, x
    anyof = SUITE[26]
    for x in [{"value": 3}, {"value": "abcdef"}, {"value": None}, {"value": 51}, {"value": True}, {}]:
        assert (validate(x, anyof) is None) == jsonschema.Draft202012Validator(anyof).is_valid(x), x


# ---------------------------------------------------------------------------------------------
# Interfaces
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_python_api(code):
    model, tok = code
    schema = {"type": "object", "properties": {"lang": {"enum": ["python", "rust"]},
                                               "lines": {"type": "integer", "minimum": 1, "maximum": 500}}}
    texts = [generate_json(model, tok, p, schema, seed=2, steps=12, chat=ChatFormat(raw=True))
             for p in ["def f(x):", "class A:"]]
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
    f = fill_json(model, tok, tok.encode_raw("def f(x):"), schema, fast(model), seed=2, samples=3)
    assert f.error is None and f.text.rstrip() == texts[0]  # sample 0 of a batch is the text alone


def cli(*args, cwd=HERE):
    return subprocess.run([sys.executable, "generate.py", "--model", "weights-code", "--steps", "12", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_command_line(tmp_path):
    schema = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 20},
                                               "year": {"type": "integer", "minimum": 1990, "maximum": 2030}},
              "required": ["title", "year"]}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    p = cli("--json-schema", str(path), "def f(x):")
    assert p.returncode == 0, p.stderr
    jsonschema.validate(json.loads(p.stdout), schema)
    assert "valid against the schema" in p.stderr
    p = cli("--json", "--seed", "5")
    assert p.returncode == 0 and isinstance(json.loads(p.stdout), dict)
    for bad, message in [({"type": "string", "format": "email"}, "error: $: unsupported keyword format"),
                         ("{not json", f"error: --json-schema {tmp_path / 'bad.json'} is not JSON (line 1:")]:
        (tmp_path / "bad.json").write_text(bad if isinstance(bad, str) else json.dumps(bad))
        p = cli("--json-schema", str(tmp_path / "bad.json"))
        assert p.returncode == 2 and p.stdout == "" and p.stderr.startswith(message), p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    p = cli("--json", "--pin", "0:x")
    assert p.returncode == 2 and "--pin does not go with --json" in p.stderr


@pytest.mark.slow
def test_serve_response_format(tmp_path):
    """The server's response_format json_schema and json_object, on chat (whole, streamed, n=2) and
    completions; what cannot be filled or is not a schema is a 400 naming it."""
    pytest.importorskip("openai")
    ckpt = shutil.copytree(HERE / "weights-code", tmp_path / "code")
    (ckpt / "chat_template.jinja").write_text(CODE_TEMPLATE)
    server = Server(ckpt, "--batch-size", 4)
    try:
        response_format_round_trip(server)
    finally:
        server.stop()


def response_format_round_trip(server):
    client = server.client()
    schema = {"type": "object", "properties": {"verdict": {"enum": ["approve", "reject"]},
                                               "score": {"type": "integer", "minimum": 1, "maximum": 10},
                                               "reason": {"type": "string", "maxLength": 30}},
              "required": ["verdict", "score", "reason"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "review", "schema": schema, "strict": True}}
    msgs = [{"role": "user", "content": "review def add(a, b): return a - b"}]
    two = client.chat.completions.create(model="x", messages=msgs, response_format=fmt, seed=4, n=2)
    assert len(two.choices) == 2 and all(c.finish_reason == "stop" for c in two.choices)
    for c in two.choices:
        jsonschema.validate(json.loads(c.message.content), schema)
    assert two.model_extra["diffusion"]["repair_rounds"] == [0, 0]
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="x", messages=msgs, response_format=fmt, seed=4, stream=True) if c.choices)
    assert streamed == two.choices[0].message.content
    any_object = client.chat.completions.create(model="x", messages=msgs, response_format={"type": "json_object"}, seed=1)
    assert isinstance(json.loads(any_object.choices[0].message.content), dict)
    text = client.completions.create(model="x", prompt="config = ", seed=2, extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(text.choices[0].text), schema)
    for bad, param in [({"type": "json_schema", "json_schema": {"schema": {"type": "string", "format": "uri"}}},
                        "response_format"), ({"type": "xml"}, "response_format.type"),
                       ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema")]:
        status, _, err = server.post("/v1/chat/completions", {"messages": msgs, "response_format": bad})
        assert status == 400 and err["error"]["param"] == param, err
    status, _, err = server.post("/v1/chat/completions", {"messages": msgs, "response_format": fmt, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]})
    assert status == 400 and "tools" in err["error"]["message"]
