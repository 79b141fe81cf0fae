"""Fine-tuning (finetune.py) and LoRA adapters (lora.py): the loss is train.py's, an adapter starts at
the base model and a step moves only it, adapters cross to and from peft on transformers' model with
the same logits, merging gives the adapter's logits, conversations put the loss on the assistant turns
only, a run resumes where it was killed, and every bad input is one line."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import finetune
import lora
import train
from conftest import CODE_TEMPLATE, Server, assert_one_line_error, cli, default_ctrl_c
from finetune import Example, example_loss
from generate import generate, load
from kvcache import KVCache
from terminal import UsageError

HERE = Path(__file__).resolve().parent
TOL = 1e-5


def logits_of(model, prompt, canvas):
    """Our causal-pass and canvas logits."""
    cache = KVCache(model.config.layer_types, model.config.sliding_window)
    with torch.no_grad():
        enc = model.logits(model.forward_causal(prompt, cache))
        return enc, model.forward_canvas(canvas, cache)


def hf_logits(hf, prompt, canvas):
    with torch.no_grad():
        out = hf(input_ids=prompt, decoder_input_ids=canvas)
        return torch.tanh(hf.lm_head(out.encoder_last_hidden_state).float() / 30) * 30, out.logits


def perturb(model, seed=0):
    """Adapters that do something (B is zero at the start)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.adapters(model).values():
            for b in m.lora_B.values():
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)


def test_the_loss_is_train_pys():
    """finetune's loss of an example is train.loss_fn's of the batch [prompt ; answer padded to a
    canvas] with the same noise: one loss for both programs."""
    model, tok = load("weights-code")
    ex = Example(tok.encode_raw("def f(x):\n"), tok.encode("    return x + 1\n") + [1], line=1)
    loss, diff, n = example_loss(model, ex, torch.Generator().manual_seed(5), 0.5)
    C = model.config.canvas_length
    batch = torch.tensor([ex.prompt + ex.answer + [0] * (C - len(ex.answer))])
    ref, ref_diff, _ = train.loss_fn(model, batch, len(ex.prompt), torch.Generator().manual_seed(5), 0.0, 0.5)
    assert torch.equal(loss, ref) and torch.equal(diff, ref_diff) and n == batch.numel()


def test_an_adapter_starts_at_the_base_and_a_step_moves_only_it():
    model, tok = load("weights-code")
    prompt, canvas = torch.tensor([tok.encode_raw("import os\n")]), torch.arange(100, 132)[None]
    base = logits_of(model, prompt, canvas)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = lora.add_lora(model, r=4, alpha=8)
    assert len(names) == 6 * 7 - 1  # 6 layers x (q, k, v, o, gate, up, down), no v on the full layer
    assert all(torch.equal(a, b) for a, b in zip(base, logits_of(model, prompt, canvas)))  # B = 0: exactly the base
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    ex = Example(prompt[0].tolist(), tok.encode("    return 1\n") + [1], line=1)
    example_loss(model, ex, torch.Generator().manual_seed(0), 0.0)[0].backward()
    opt.step()
    after = model.state_dict()
    for k, v in before.items():  # the base, under its wrapped name
        w = after[k] if k in after else after[k.replace(".weight", ".base.weight")]
        assert torch.equal(v, w), k
    assert any(b.abs().sum() > 0 for m in lora.adapters(model).values() for b in m.lora_B.values())


def test_an_adapter_made_here_loads_in_peft_with_the_same_logits(ckpt_b, tmp_path):
    peft = pytest.importorskip("peft")
    import transformers
    path, _ = ckpt_b
    model, _ = load(path, "cpu", torch.float32)
    lora.add_lora(model, r=4, alpha=8)
    perturb(model)
    lora.save_adapter(model, tmp_path / "ad", base_model=str(path))
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    hf = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    prompt, canvas = torch.arange(3, 40)[None], torch.arange(50, 58)[None]
    for ours, theirs in zip(logits_of(model, prompt, canvas), hf_logits(pm.base_model.model, prompt, canvas)):
        torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)  # the causal pass and the canvas pass
    plain = hf_logits(transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval(),
                      prompt, canvas)
    assert (plain[1] - logits_of(model, prompt, canvas)[1]).abs().max() > 1e-3  # the adapter does something


def test_an_adapter_made_by_peft_loads_here(ckpt_b, tmp_path):
    """peft trains the two module paths of the stack apart: its encoder and decoder copies differ, and
    each pass here applies its own."""
    peft = pytest.importorskip("peft")
    import transformers
    path, _ = ckpt_b
    hf = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()
    target = r"model\.(decoder|encoder\.language_model)\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=target))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(tmp_path / "peft")
    pm.eval()
    model, _ = load(path, "cpu", torch.float32, adapter=tmp_path / "peft")
    assert all(set(m.lora_A) == {"causal", "canvas"} for m in lora.adapters(model).values())
    prompt, canvas = torch.arange(3, 40)[None], torch.arange(50, 58)[None]
    for ours, theirs in zip(logits_of(model, prompt, canvas), hf_logits(pm.base_model.model, prompt, canvas)):
        torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)
    with pytest.raises(Exception, match="separate weights for the two passes"):
        lora.merge_adapter(model)


@pytest.mark.slow
def test_merge_gives_the_adapters_logits_here_and_in_transformers(ckpt_b, tmp_path):
    import transformers
    path, _ = ckpt_b
    model, _ = load(path, "cpu", torch.float32)
    lora.add_lora(model, r=4, alpha=8)
    perturb(model, seed=3)
    lora.save_adapter(model, tmp_path / "ad")
    p = subprocess.run([sys.executable, "finetune.py", "--merge", str(tmp_path / "ad"), "--model", str(path), "--out",
                        str(tmp_path / "merged")], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    prompt, canvas = torch.arange(3, 40)[None], torch.arange(50, 58)[None]
    want = logits_of(model, prompt, canvas)
    merged, _ = load(tmp_path / "merged", "cpu", torch.float32)
    assert not lora.adapters(merged)
    for a, b in zip(logits_of(merged, prompt, canvas), want):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    hf = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    for a, b in zip(hf_logits(hf, prompt, canvas), want):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)


def test_a_conversation_puts_the_loss_on_its_assistant_turns(tmp_path):
    d = tmp_path / "chat"
    import shutil
    shutil.copytree(HERE / "weights-code", d)
    (d / "chat_template.jinja").write_text(CODE_TEMPLATE)
    model, tok = load(d)
    f = tmp_path / "data.jsonl"
    conv = [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "return a + b"},
            {"role": "user", "content": "and subtract?"}, {"role": "assistant", "content": "return a - b"}]
    f.write_text(json.dumps({"messages": conv}) + "\n" + json.dumps({"prompt": "x = ", "completion": "1"}) + "\n")
    examples = finetune.read_examples(f, tok, model.config, 1)
    assert len(examples) == 3
    first, second, raw = examples
    assert tok.decode(second.prompt).count("return a + b") == 1 and "return a - b" not in tok.decode(second.prompt)
    assert tok.decode(first.answer).strip() == "return a + b" and tok.decode(second.answer).strip() == "return a - b"
    batch, prefix = finetune.packed(second, model.config.canvas_length, 0, "cpu")
    assert batch[0, :prefix].tolist() == second.prompt  # clean, never in the loss
    assert batch[0, prefix:].tolist()[: len(second.answer)] == second.answer  # what the loss is on: the turn ...
    assert set(batch[0, prefix + len(second.answer):].tolist()) <= {0}  # ... and the canvas's padding
    assert raw.answer == tok.encode("1") + [1]  # a raw completion ends with the model's end token


def run_ft(*args, timeout=600):
    return subprocess.Popen([sys.executable, "finetune.py", *map(str, args)], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_ctrl_c)


def adapter_tensors(run: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_adapter(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"# {k}\ndef f(x):\n", "completion": f"    return x + {k}\n"}) + "\n"
                            for k in range(12)))
    common = ["--model", "weights-code", "--data", data, "--steps", 8, "--eval-every", 2, "--eval-share", 0.05,
              "--rank", 4, "--quiet", "--no-checkpointing"]
    straight = run_ft(*common, "--out", tmp_path / "a")
    assert straight.wait(timeout=600) == 0, straight.stderr.read()
    killed = run_ft(*common, "--out", tmp_path / "b")
    log = tmp_path / "b" / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and any(json.loads(x)["step"] >= 2 for x in log.read_text().splitlines())):
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    steps_before = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    assert 2 <= max(steps_before) < 8
    again = run_ft(*common, "--out", tmp_path / "b")
    assert again.wait(timeout=600) == 0, again.stderr.read()
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    assert steps[-1] == 8 and steps[: len(steps_before)] == steps_before
    a, b = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same run, as if never stopped
    # Ctrl-C from the first evaluation on (log.jsonl is its first write) saves the run: exit 130, one line
    interrupted = run_ft(*common[:5], 1000, *common[6:], "--out", tmp_path / "c")
    while time.time() < deadline + 200 and not (tmp_path / "c" / "log.jsonl").exists():
        time.sleep(0.2)
    interrupted.send_signal(signal.SIGINT)
    assert interrupted.wait(timeout=120) == 130
    err = interrupted.stderr.read()
    assert (tmp_path / "c" / "state.pt").exists() and "run the same command to go on" in err and "Traceback" not in err


def test_ctrl_c_in_the_first_evaluation_saves_the_run(tmp_path, monkeypatch):
    """The evaluation before step 1 is inside the run: Ctrl-C there saves the state and returns 130."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"# {k}\n", "completion": f"x = {k}\n"}) + "\n" for k in range(12)))
    monkeypatch.setattr(finetune, "evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    args = finetune.build_parser().parse_args(["--model", "weights-code", "--data", str(data), "--out", str(tmp_path / "r"),
                                               "--steps", "4", "--rank", "4", "--quiet", "--no-checkpointing"])
    try:
        code = finetune.finetune(args)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C in the first evaluation escaped the run")
    assert code == 130
    assert (tmp_path / "r" / "state.pt").exists() and (tmp_path / "r" / "adapter").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("lines,needle", [
    (["not json"], "line 1 is not JSON"), ([{"text": "x"}], "neither"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "no chat format"),
    ([{"prompt": "x = 1\n" * 3000, "completion": "y"}], "positions")])
def test_bad_data_is_one_line(lines, needle, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    p = subprocess.run([sys.executable, "finetune.py", "--data", str(f), "--out", str(tmp_path / "r"), "--quiet"],
                       cwd=HERE, capture_output=True, text=True, timeout=300)
    assert_one_line_error(p.returncode, p.stderr, 2, needle)
    assert not (tmp_path / "r" / "adapter").exists()


def test_a_conversation_without_an_assistant_turn(tmp_path):
    model, _ = load("weights-code")
    tok = load_chat_tokenizer(tmp_path)
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(UsageError, match="no assistant turn"):
        finetune.read_examples(f, tok, model.config, 1)


def load_chat_tokenizer(tmp_path):
    from tokenizer import Tokenizer
    return Tokenizer(HERE / "weights-code" / "tokenizer.json", CODE_TEMPLATE)


@pytest.mark.slow
def test_an_adapter_through_every_entrance(ckpt_b, tmp_path):
    """load(adapter=), generate.py --adapter and python -m server --adapter: the same text; an adapter of
    another model, or a folder that is none, is one line."""
    model, tok = load("weights-code")
    lora.add_lora(model, r=4, alpha=8)
    perturb(model, seed=2)
    lora.save_adapter(model, tmp_path / "ad")
    adapted, tok = load("weights-code", adapter=tmp_path / "ad")
    text = generate(adapted, tok, "def f(x):", max_new_tokens=16, seed=0)
    assert text != generate(load("weights-code")[0], tok, "def f(x):", max_new_tokens=16, seed=0)
    rc, out, err = cli("--model", "weights-code", "--adapter", tmp_path / "ad", "--max-new-tokens", 16, "--quiet",
                       "def f(x):")
    assert rc == 0 and out == "def f(x):" + text + "\n", err
    server = Server("weights-code", "--adapter", tmp_path / "ad")
    try:
        status, _, body = server.post("/v1/completions", {"prompt": "def f(x):", "max_tokens": 16, "seed": 0})
        assert status == 200 and body["choices"][0]["text"] == text
    finally:
        assert server.stop() == 0
    other, _ = load(ckpt_b[0], "cpu", torch.float32)
    lora.add_lora(other, r=4, alpha=8)
    lora.save_adapter(other, tmp_path / "other")
    rc, out, err = cli("--model", "weights-code", "--adapter", tmp_path / "other", "x")
    assert_one_line_error(rc, err, 1, "does not fit the model")
    rc, out, err = cli("--model", "weights-code", "--adapter", tmp_path, "x")
    assert_one_line_error(rc, err, 1, "is not an adapter")


def test_sudoku_data_for_the_released_recipe(tmp_path):
    """--make-sudoku-data: 9x9 puzzles and their unique solutions as chat turns, grouped by clue count."""
    import sudoku
    f = tmp_path / "s.jsonl"
    finetune.make_sudoku_data(f, 6, seed=3)
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    assert len(rows) == 6
    for r in rows:
        user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        puzzle = [int(c) for c in "".join(user.splitlines()[-9:])]
        solution = [int(c) for c in answer.replace("\n", "")]
        givens = sum(1 for d in puzzle if d)
        assert sudoku.is_valid(solution, sudoku.SHAPES[9], puzzle)
        assert len(sudoku.solve(puzzle, sudoku.SHAPES[9], limit=2)) == 1  # one solution: exact match is fair
        assert r["group"] == (">= 40 givens" if givens >= 40 else "30-39 givens" if givens >= 30 else "< 30 givens")


def test_exact_answers_are_counted_by_group():
    """--exact compares each generated answer with the reference: an answer the model writes itself for
    that seed counts, another does not; the share is given overall and by group."""
    from sampler import block_diffusion
    model, tok = load("weights-code")
    prompt = tok.encode_raw("def f(x):\n")
    s = model.generation_settings.copy(max_new_tokens=model.config.canvas_length)
    own = block_diffusion(model, [prompt], s, seeds=[0]).tokens[0]
    examples = [Example(prompt, own, 1, "mine"), Example(prompt, tok.encode("    pass\n") + [1], 2, "other")]
    out = finetune.evaluate(model, tok, examples, exact=True, seed=0)
    assert out["exact"] == {"all": 0.5, "mine": 1.0, "other": 0.0}
    assert set(out) >= {f"loss@{t}" for t in finetune.NOISE_LEVELS}


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_quantized_base_takes_an_adapter(kind):
    """LoRA over quantized attention and MLP layers (the base only read, dequantized): it starts at the
    quantized model's logits and trains."""
    from quant import quantized_copy
    model, tok = load("weights-code")
    q = quantized_copy(model, {"experts": kind, "group_size": 64, "zero_point": True, "attention": kind, "mlp": kind,
                               "embedding": None})
    prompt, canvas = torch.tensor([tok.encode_raw("import os\n")]), torch.arange(100, 132)[None]
    base = logits_of(q, prompt, canvas)
    lora.add_lora(q, r=4, alpha=8)
    assert all(torch.equal(a, b) for a, b in zip(base, logits_of(q, prompt, canvas)))
    loss, _, _ = example_loss(q, Example(prompt[0].tolist(), tok.encode("    pass\n") + [1], 1),
                              torch.Generator().manual_seed(0), 0.0)
    loss.backward()
    grads = [p.grad for m in lora.adapters(q).values() for p in m.lora_B.values()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
