"""Typed canvases (structured.py, editing.fill_json, the sampler's restriction): the token
sets a tokenizer's vocabulary gives, the restriction inside the sampler step, schemas laid out,
filled, repaired and refused, a suite of schemas whose every output the jsonschema library
accepts, and the command line, Python and server interfaces."""

import json
import math
import re
import shutil
import subprocess
import sys

import jsonschema
import pytest
import torch

import sudoku
from conftest import CODE_TEMPLATE, GEMMA4_TOKENIZER, HERE, Server, needs_gemma4, random_fillings
from generate import generate_json, load
from sampler import DenoiseState, GenerationSettings, SamplerSettings, block_diffusion, entropy, restrict, sampler_step
from streams import RandomStreams
from editing import Filled, fill_json, fill_typed
from structured import Allowed, TokenSets, build, check_schema, token_sets, validate
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
def test_patterns_write_ascii_only():
    """Python's \\d matches every decimal digit and str.isdigit even '²': a pattern's positions take
    printable ASCII only, and what is read back matches in any regex dialect, whatever was written."""
    tok = tokenizer_of("gemma4")
    sets = token_sets(tok, tok.vocab_size)
    pattern = "^\\d\\w[^a-z].[x-z]\\.$"
    lay = build({"type": "string", "pattern": pattern}, tok, sets)
    allowed = {sets.texts[i] for j in lay.free for i in lay.sets[lay.free[j]]}
    assert all(c.isascii() and c.isprintable() for s in allowed for c in s)
    for tokens in random_fillings(lay, 20):
        value, _ = lay.read(tokens)
        assert re.fullmatch(pattern, value) and value.isascii()
    assert any("\u0663" == t for t in sets.texts) and any(t == "\u00b2" for t in sets.texts)  # the vocab has them


def test_layout_pins_the_skeleton_and_leaves_the_choices(code):
    _, tok = code
    sets = token_sets(tok, 8192)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 70},
                                               "s": {"type": "string", "maxLength": 4}, "b": {"type": "boolean"}},
              "required": ["n", "s"]}
    lay = build(schema, tok, sets)
    skeleton = "".join("_" if t is None else tok.decode([t]) for t in lay.tokens)
    assert skeleton == '{"n": __, "s": "____"_"b": _}', skeleton  # "b" after a decision: "," or a space
    n_sets = [set(lay.sets[lay.free[j]]) for j in sorted(lay.free)[:2]]
    assert all({tok.decode([i]) for i in x} == set("0123456789 ") for x in n_sets)
    s_set = set(lay.sets[lay.free[sorted(lay.free)[2]]])
    assert sets.quote in s_set and all(len(sets.texts[i]) == 1 for i in s_set)  # 4 positions, 4 characters at most


# ---------------------------------------------------------------------------------------------
# The model chooses: a planted logit bias at a decision decides it
# ---------------------------------------------------------------------------------------------

class Biased(torch.nn.Module):
    """A model that is another plus a large logit bias at chosen canvas positions (the loop's contract:
    config, device, dtype, forward_causal, forward_canvas)."""

    def __init__(self, model, bias: dict):
        super().__init__()
        self.inner, self.bias = model, bias
        self.config, self.generation_settings = model.config, model.generation_settings

    @property
    def device(self):
        return self.inner.device

    @property
    def dtype(self):
        return self.inner.dtype

    def forward_causal(self, *a, **kw):
        return self.inner.forward_causal(*a, **kw)

    def forward_canvas(self, *a, **kw):
        logits = self.inner.forward_canvas(*a, **kw)
        for j, t in self.bias.items():
            logits[:, j, t] += 50.0
        return logits


def choose(code, schema, pick):
    """fill_json on the code model with a bias towards pick(layout, sets) -> {offset: token}."""
    model, tok = code
    sets = token_sets(tok, 8192)
    lay = build(schema, tok, sets)
    f = fill_json(Biased(model, pick(lay, sets)), tok, tok.encode_raw("x = "), schema, fast(model), seed=0)
    assert f.error is None
    return f.value


def test_the_model_chooses_a_strings_end(code):
    schema = {"type": "string"}
    value = choose(code, schema, lambda lay, sets: {sorted(lay.free)[2]: sets.quote})
    _, tok = code
    assert 1 <= len(tok.encode(value)) <= 2  # ended at the third position: two tokens written (or fewer)


def test_the_model_chooses_an_arrays_length(code):
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1}
    decisions = lambda lay: [j for j in sorted(lay.free) if set(lay.sets[lay.free[j]]) == {  # noqa: E731
        token_sets(code[1], 8192).comma, token_sets(code[1], 8192).space}]
    one = choose(code, schema, lambda lay, sets: {decisions(lay)[0]: sets.space})
    three = choose(code, schema, lambda lay, sets: {j: sets.comma for j in decisions(lay)[:2]} |
                   {decisions(lay)[2]: sets.space})
    assert len(one) == 1 and len(three) == 3


def test_the_model_chooses_an_optional_property(code):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}}, "required": ["a"]}
    gone = choose(code, schema, lambda lay, sets: {[j for j in sorted(lay.free) if set(lay.sets[lay.free[j]]) ==
                                                     {sets.comma, sets.space}][0]: sets.space})
    there = choose(code, schema, lambda lay, sets: {[j for j in sorted(lay.free) if set(lay.sets[lay.free[j]]) ==
                                                      {sets.comma, sets.space}][0]: sets.comma})
    assert set(gone) == {"a"} and set(there) == {"a", "b"}


def test_the_model_chooses_a_branch(code):
    schema = {"oneOf": [{"type": "string", "maxLength": 4}, {"type": "integer", "minimum": 10, "maximum": 20}]}
    _, tok = code
    second = choose(code, schema, lambda lay, sets: {sorted(lay.free)[0]: sets.chars["0"][0]})
    first = choose(code, schema, lambda lay, sets: {sorted(lay.free)[0]: sets.quote})
    assert isinstance(second, int) and 10 <= second <= 20 and isinstance(first, str)


# ---------------------------------------------------------------------------------------------
# The suite: every output validates, judged by jsonschema
# ---------------------------------------------------------------------------------------------

def fill_suite(model, tok, prompt: list[int], settings: GenerationSettings) -> list[tuple[int, Filled]]:
    sets = token_sets(tok, model.config.vocab_size)
    out = []
    for k, schema in enumerate(SUITE):
        check_schema(schema)
        lay = build(schema, tok, sets)
        out += [(k, f) for f in fill_typed(model, tok, prompt, [lay] * len(SEEDS), settings, SEEDS)]
    return out


def assert_all_valid(results):
    assert len(SUITE) >= 30 and len(results) == len(SUITE) * len(SEEDS)
    for k, f in results:
        value = json.loads(f.text)
        jsonschema.validate(value, SUITE[k])
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
    for bad, message in [({"type": "string", "pattern": "^(a)\\1$"}, "error: $: pattern"),
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
    for bad, param in [({"type": "json_schema", "json_schema": {"schema": {"$ref": "https://example.com/s.json"}}},
                        "response_format"), ({"type": "xml"}, "response_format.type"),
                       ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema")]:
        status, _, err = server.post("/v1/chat/completions", {"messages": msgs, "response_format": bad})
        assert status == 400 and err["error"]["param"] == param, err
    status, _, err = server.post("/v1/chat/completions", {"messages": msgs, "response_format": fmt, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]})
    assert status == 400 and "tools" in err["error"]["message"]
    # a call that must be made: its arguments follow the function's parameters, every time
    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                "unit": {"enum": ["C", "F"]}, "days": {"type": "integer", "minimum": 1,
                                                                                       "maximum": 7}},
               "required": ["city", "unit"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "forecast", "parameters": weather}},
             {"type": "function", "function": {"name": "alarm", "parameters": {"type": "object", "properties": {
                 "at": {"type": "string", "format": "time"}}, "required": ["at"]}}}]
    for seed in range(3):
        r = client.chat.completions.create(model="x", messages=msgs, tools=tools, seed=seed,
                                           tool_choice={"type": "function", "function": {"name": "forecast"}})
        call = r.choices[0].message.tool_calls[0]
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "forecast"
        jsonschema.validate(json.loads(call.function.arguments), weather)
        r = client.chat.completions.create(model="x", messages=msgs, tools=tools, seed=seed, tool_choice="required")
        call = r.choices[0].message.tool_calls[0]
        params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), params)


@pytest.mark.slow
def test_the_benchmark_script_on_a_folder_of_splits(tmp_path):
    """scripts/jsonschemabench.py on two small splits (the real data is fetched by the script, never
    kept here): every schema valid or refused by name, none invalid, the table beside the published figures."""
    for split, schemas in {"Glaiveai2K": [SUITE[0], SUITE[5]], "Github_easy": [{"$ref": "https://x.org/s.json"}]}.items():
        (tmp_path / "data" / split).mkdir(parents=True)
        for i, s in enumerate(schemas):
            (tmp_path / "data" / split / f"s{i}.json").write_text(json.dumps(s))
    p = subprocess.run([sys.executable, "scripts/jsonschemabench.py", "--data", str(tmp_path), "--timing", "1",
                        "--json", str(tmp_path / "out.json")], cwd=HERE, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    out = json.loads((tmp_path / "out.json").read_text())["weights-code"]
    assert out["Glaiveai2K"]["valid"] == 2 and out["Github_easy"]["refused"] == {"$ref outside the schema": 1}
    assert all(r["invalid"] == 0 and r["crashed"] == 0 for r in out.values())
    assert "| Glaiveai2K | 2 | 100% | 96% |" in p.stdout
    p = subprocess.run([sys.executable, "scripts/jsonschemabench.py", "--data", str(tmp_path), "--layout-only",
                        "--json", str(tmp_path / "lay.json")], cwd=HERE, capture_output=True, text=True, timeout=600)
    lay = json.loads((tmp_path / "lay.json").read_text())["weights-code"]
    assert lay["Glaiveai2K"]["laid_out"] == 2 and len(lay["Glaiveai2K"]["build_ms"]) == 2
    assert lay["Github_easy"]["refused"] == {"$ref outside the schema": 1} and "| Github_easy | 1 | 0.0% |" in p.stdout
