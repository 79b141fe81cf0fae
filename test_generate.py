"""The command line and the Python API: real runs end to end, the prompt as the model gets it, thoughts
shown apart, batches in order, Ctrl-C, NaN logits, out of memory, and every user mistake as one line."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate
from tokenizer import ChatFormat
import sampler
from conftest import assert_one_line_error, cli, in_process, needs_gemma4

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_generates_end_to_end(chat_free_ckpt):
    rc, out, err = cli("--model", chat_free_ckpt, "--max-new-tokens", 10, "--steps", 3, "--seed", 1, "def add")
    assert rc == 0, err
    assert out.startswith("def add") and out.endswith("\n")  # a raw prompt reads on into its continuation
    closing = err.strip().splitlines()[-1]
    assert "canvases" in closing and "tok/s" in closing and "device cpu" in closing
    rc2, out2, _ = cli("--model", chat_free_ckpt, "--max-new-tokens", 10, "--steps", 3, "--seed", 1, "def add")
    assert out2 == out  # the same seed, the same text


def test_python_api_and_exact_max_new_tokens(chat_free_ckpt):
    from sampler import block_diffusion
    model, tok = generate.load(chat_free_ckpt, device="cpu", dtype=torch.float32)
    texts = generate.generate(model, tok, ["def add", "the quick brown fox jumps"], max_new_tokens=11, steps=2, seed=0)
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)
    settings = generate.settings_for(model, max_new_tokens=11, steps=2, eos_token_ids=())
    torch.manual_seed(0)
    r = block_diffusion(model, [tok.encode_raw("for i in")], settings)
    assert r.sequences.shape[1] == len(tok.encode_raw("for i in")) + 16  # two whole canvases of 8 ...
    assert len(r.tokens[0]) == 11  # ... trimmed to exactly 11 tokens


@pytest.mark.slow
def test_batches_keep_the_input_order(chat_free_ckpt, tmp_path, monkeypatch):
    f = tmp_path / "prompts.txt"
    f.write_text("".join(f"prompt number {i}\n" for i in range(7)) + "\n", encoding="utf-8")
    rc, out, err = cli("--model", chat_free_ckpt, "--batch-file", f, "--batch-size", 3, "--max-new-tokens", 8,
                       "--steps", 2)
    assert rc == 0, err
    headers = [ln for ln in out.splitlines() if ln.startswith("=== ")]
    assert headers == [f"=== {i + 1}: prompt number {i}" for i in range(7)]
    # the default batch size is bounded: 1,000 prompts never make one batch of 1,000
    model, tok = generate.load(chat_free_ckpt, device="cpu", dtype=torch.float32)
    sizes = []
    real = sampler.block_diffusion
    monkeypatch.setattr(sampler, "block_diffusion", lambda m, p, s, **kw: sizes.append(len(p)) or real(m, p, s, **kw))
    prompts = [[2, 5 + i % 7] for i in range(200)]
    results = sampler.run_batches(model, prompts, generate.settings_for(model, max_new_tokens=4, steps=1),
                                  generate.default_batch_size(model, len(prompts)))
    assert max(sizes) <= generate.MAX_DEFAULT_BATCH and sum(len(r.tokens) for r in results) == 200


@pytest.mark.slow
def test_show_canvas(chat_free_ckpt):
    rc, out, err = cli("--model", chat_free_ckpt, "--show-canvas", "--max-new-tokens", 8, "--steps", 3, "x")
    assert rc == 0, err
    assert "canvas 1 · step 3" in err and "\033[" in err


@pytest.mark.slow
@needs_gemma4
def test_print_prompt_needs_no_weights(chat_ckpt, tmp_path):
    d = shutil.copytree(chat_ckpt, tmp_path / "c")
    (d / "model.safetensors").unlink()  # only the tokenizer and the config are read
    rc, out, err = cli("--model", d, "--print-prompt", "--system", "Be brief.", "--thinking", "Hi")
    assert rc == 0, err
    assert out == "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n\n"
    assert err.strip().endswith("tokens")


@pytest.mark.slow
@needs_gemma4
def test_thinking_is_shown_apart(chat_ckpt):
    """A reply that begins with a thought (pinned here): the answer on stdout, the thought on stderr."""
    pin = "0:<|channel>thought\nweighing it<channel|>"
    rc, out, err = cli("--model", chat_ckpt, "--thinking", "--pin", pin, "--max-new-tokens", 8, "--steps", 2, "Hi")
    assert rc == 0, err
    assert "thinking: weighing it" in err and "weighing" not in out and "thought" not in out
    rc, out, err = cli("--model", chat_ckpt, "--pin", pin, "--max-new-tokens", 8, "--steps", 2, "Hi")
    assert rc == 0 and "weighing" not in out + err  # without --thinking the thought is not shown


def fake_failure(monkeypatch, exc_on_canvas: int, exc):
    """block_diffusion that raises exc once canvas exc_on_canvas has been committed."""
    real = sampler.block_diffusion

    def failing(model, prompts, settings, on_canvas=None, **kw):
        def hook(ci, seq, finished):
            if on_canvas is not None:
                on_canvas(ci, seq, finished)
            if ci == exc_on_canvas:
                raise exc
        return real(model, prompts, settings, on_canvas=hook, **kw)
    monkeypatch.setattr(sampler, "block_diffusion", failing)


def test_ctrl_c_shows_what_was_committed(chat_free_ckpt, tmp_path, monkeypatch, capsys):
    f = tmp_path / "p.txt"
    f.write_text("def add\nthe quick brown\n", encoding="utf-8")
    fake_failure(monkeypatch, 0, KeyboardInterrupt())
    rc, out, err = in_process(capsys, "--model", chat_free_ckpt, "--batch-file", f, "--max-new-tokens", 16,
                              "--steps", 2, "--device", "cpu")
    assert rc == 130 and err.strip().endswith("interrupted") and "Traceback" not in err
    assert out.count("=== ") == 2 and "=== 2: the quick brown" in out  # the batch's rows, first canvas each


def test_nan_logits_stop_with_one_line(chat_free_ckpt, monkeypatch, capsys):
    from sampler import NonFiniteLogits
    fake_failure(monkeypatch, 0, NonFiniteLogits(1, 7))
    rc, out, err = in_process(capsys, "--model", chat_free_ckpt, "--max-new-tokens", 16, "--steps", 2, "--quiet",
                              "--device", "cpu", "def add")
    assert_one_line_error(rc, err, 1, "canvas 2, step 7", "--dtype float32")
    assert out.startswith("def add") and len(out) > len("def add\n")  # the first canvas stays printed


def test_out_of_memory_says_the_ways_out(chat_free_ckpt, monkeypatch, capsys):
    fake_failure(monkeypatch, 0, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    rc, out, err = in_process(capsys, "--model", chat_free_ckpt, "--max-new-tokens", 16, "--steps", 2, "--quiet",
                              "--device", "cpu", "x")
    assert_one_line_error(rc, err, 1, "out of memory on cpu", "allocating 2.00 GiB", "free of", "quantize.py",
                          "--batch-size", "--max-new-tokens")


# ---- user mistakes: one line, no traceback ------------------------------------------------------

def test_missing_path(tmp_path, capsys):
    assert_one_line_error(*in_process(capsys, "--model", tmp_path / "nope", "hi")[::2], 1, "does not exist")


def test_no_config_json(tmp_path, capsys):
    assert_one_line_error(*in_process(capsys, "--model", tmp_path, "hi")[::2], 1, "no config.json")


def test_empty_prompt(chat_free_ckpt, capsys):
    assert_one_line_error(*in_process(capsys, "--model", chat_free_ckpt, "--device", "cpu", "   ")[::2], 2,
                          "prompt is empty")


def test_prompt_longer_than_context(chat_free_ckpt, tmp_path, capsys):
    import json
    d = shutil.copytree(chat_free_ckpt, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    rc, _, err = in_process(capsys, "--model", d, "--device", "cpu", "--max-new-tokens", 8, "the quick brown fox " * 30)
    assert_one_line_error(rc, err, 2, "positions", "64", "shorten")


@pytest.mark.parametrize("args,needle", [
    (["--steps", "0"], "--steps"), (["--steps", "-3"], "--steps"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--entropy-bound", "-0.5"], "--entropy-bound"), (["--steps", "many"], "--steps"),
    (["--batch-size", "0"], "--batch-size"), (["--kernels", "fast"], "--kernels")])
def test_bad_numbers(chat_free_ckpt, capsys, args, needle):
    with pytest.raises(SystemExit) as e:
        generate.run(["--model", str(chat_free_ckpt), *args, "hi"])
    assert_one_line_error(e.value.code, capsys.readouterr().err, 2, needle)


@pytest.mark.parametrize("args,needle", [
    (["--accept", "true"], "--samples"), (["--hole", "__", "--template", "a__b"], "--hole"),
    (["--infill", "a<FILL>b", "--template", "a_b"], "give one of"), (["--chat"], "give one of"),
    (["--template", "no holes"], "no hole"), (["--infill", "no gap"], "<FILL>"),
    (["--pin", "x:)"], "OFFSET:TEXT"), (["--pin", "99:)"], "beyond")])
def test_bad_requests(chat_free_ckpt, capsys, args, needle):
    rc, _, err = in_process(capsys, "--model", chat_free_ckpt, "--device", "cpu", "--max-new-tokens", 8, *args,
                            *(["hi"] if "--template" not in args and "--infill" not in args else []))
    assert_one_line_error(rc, err, 2, needle)


def test_batch_file_not_utf8(chat_free_ckpt, tmp_path, capsys):
    f = tmp_path / "latin1.txt"
    f.write_bytes("café\n".encode("latin-1"))
    assert_one_line_error(*in_process(capsys, "--model", chat_free_ckpt, "--batch-file", f)[::2], 2, "not UTF-8")


@pytest.mark.slow
def test_no_model_anywhere(tmp_path):
    """Without --model, generate.py uses ./weights; a copy of the program without it says what to do."""
    for f in HERE.glob("*.py"):
        shutil.copy(f, tmp_path / f.name)
    shutil.copytree(HERE / "cuda_kernels", tmp_path / "cuda_kernels")
    p = subprocess.run([sys.executable, str(tmp_path / "generate.py")], capture_output=True, text=True, cwd=tmp_path)
    assert_one_line_error(p.returncode, p.stderr, 2, "no model given", "--model")


# ---- the device: its own errors, never blamed on the files ---------------------------------------

def test_an_unknown_device_is_a_flag_mistake(capsys):
    with pytest.raises(SystemExit) as e:
        generate.run(["--device", "tpu", "hi"])
    assert_one_line_error(e.value.code, capsys.readouterr().err, 2, "unknown device 'tpu'", "cuda, cuda:N, cpu or mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_names_the_device_not_the_files(capsys):
    rc, _, err = in_process(capsys, "--model", "weights-code", "--device", "cuda", "--max-new-tokens", 4, "x")
    assert_one_line_error(rc, err, 1, "CUDA is not available", "--device cpu")
    assert "download" not in err and "safetensors" not in err


def test_a_device_that_fails_while_loading_is_the_devices_fault(monkeypatch, capsys):
    import checkpoint

    class Unmovable(torch.Tensor):
        def to(self, *a, **kw):
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")
    with pytest.raises(checkpoint.DeviceError, match="cannot move the weights to cpu: CUDA error: an illegal memory"):
        checkpoint.to_device(torch.zeros(2).as_subclass(Unmovable), torch.device("cpu"))
    monkeypatch.setattr(checkpoint, "to_device", lambda t, d: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")))
    rc, _, err = in_process(capsys, "--model", "weights-code", "--device", "cpu", "x")
    assert_one_line_error(rc, err, 1, "out of memory on cpu", "allocating 1.50 GiB", "while loading the weights",
                          "quantize.py", "torchrun")
    assert "download" not in err and "--batch-size" not in err


# ---- the same seed, the same text, whatever the batch -------------------------------------------

@pytest.mark.slow
def test_a_prompt_gets_the_same_text_alone_and_in_any_batch(chat_free_ckpt, tmp_path):
    """Every prompt draws from its own stream (--seed): its text does not depend on the prompts
    beside it, nor on --batch-size (whose default depends on the free memory)."""
    args = ["--model", chat_free_ckpt, "--max-new-tokens", 12, "--steps", 3, "--seed", 5, "--quiet"]
    rc, alone, err = cli(*args, "def add")
    assert rc == 0 and alone.startswith("def add"), err
    f = tmp_path / "p.txt"
    f.write_text("the quick brown fox\n\ndef add\nfor i in range(10):\n", encoding="utf-8")
    for size in (1, 2, 3):
        rc, out, err = cli(*args, "--batch-file", f, "--batch-size", size)
        assert rc == 0, err
        blocks = out.split("=== ")[1:]
        assert [b.split("\n")[0] for b in blocks] == ["1: the quick brown fox", "3: def add", "4: for i in range(10):"]
        assert "def add" + blocks[1].split("\n", 1)[1] == alone  # the file's line numbers head the outputs
    model, tok = generate.load(chat_free_ckpt, device="cpu", dtype=torch.float32)
    raw = ChatFormat(raw=True)
    one = generate.generate(model, tok, "def add", max_new_tokens=12, steps=3, seed=5, chat=raw)
    three = generate.generate(model, tok, ["x = 1", "def add", "y"], max_new_tokens=12, steps=3, seed=5, chat=raw,
                              batch_size=3)
    assert three[1] == one and "def add" + one + "\n" == alone


# ---- what a model cannot do is refused, never changed silently ----------------------------------

@pytest.mark.parametrize("flags", [["--chat"], ["--system", "be brief", "hi"], ["--thinking", "hi"],
                                   ["--print-prompt", "--system", "be brief", "hi"]])
def test_chat_flags_need_a_chat_format(flags, capsys):
    rc, out, err = in_process(capsys, "--model", "weights-code", "--device", "cpu", *flags)
    assert_one_line_error(rc, err, 2, "weights-code has no chat format", "instruction-tuned")
    assert out == ""


@pytest.mark.parametrize("flag,needle", [(["--pin", "-1:x"], "OFFSET 0 or more"), (["--pin=-1:x"], "cannot be negative")])
def test_a_negative_pin(flag, needle, capsys):
    try:
        rc = generate.run(["--model", "weights-code", "--device", "cpu", *flag, "x"])
    except SystemExit as e:
        rc = e.code
    assert_one_line_error(rc, capsys.readouterr().err, 2, needle)


def test_batch_file_mistakes_come_before_the_weights(tmp_path, capsys):
    d = shutil.copytree(HERE / "weights-code", tmp_path / "c")
    for shard in d.glob("*.safetensors"):
        shard.unlink()  # any read of the weights would fail
    f = tmp_path / "b.txt"
    f.write_bytes("ok\nfine\ncaf\xe9\n".encode("latin-1"))
    rc, _, err = in_process(capsys, "--model", d, "--batch-file", f)
    assert_one_line_error(rc, err, 2, "is not UTF-8 text (line 3)")
    f.write_text("ok\n" + "long " * 5000 + "\n", encoding="utf-8")
    rc, _, err = in_process(capsys, "--model", d, "--batch-file", f)
    assert_one_line_error(rc, err, 2, "the prompt on line 2 has", "positions")


@pytest.mark.slow
def test_the_closing_line_and_the_canvas_view(chat_free_ckpt):
    rc, out, err = cli("--model", chat_free_ckpt, "--steps", 3, "--show-canvas", "--max-new-tokens", 8, "x")
    assert rc == 0, err
    closing = err.strip().splitlines()[-1].split("\033[J")[-1]  # after the view's last clear
    assert closing.startswith("8 tokens, 1 canvas, ") and "(stopped at --max-new-tokens 8)" in closing
    assert "canvas 1 · step 1/3" in err  # counts up, out of the most it may take
    rc, out, err = cli("--model", "weights-code", "--steps", 2, "--seed", 1, "x")
    assert rc == 0 and "of generation_config.json; --max-new-tokens N for more" in err.strip().splitlines()[-1]


# ---- every entrance: the same defaults, the same refusals ---------------------------------------

def test_the_api_gives_the_command_lines_text(capsys):
    """load() picks the command line's dtype on the CPU (float32), so the same seed gives the same
    text from Python as from `python generate.py` (generate.py's own docstring example)."""
    model, tok = generate.load("weights-code")
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    text = generate.generate(model, tok, "def fib(n):", max_new_tokens=16, seed=0)
    rc, out, err = in_process(capsys, "--model", "weights-code", "--max-new-tokens", 16, "--seed", 0, "--quiet",
                              "def fib(n):")
    assert rc == 0 and out == "def fib(n):" + text + "\n", err


@pytest.mark.slow
def test_bundled_models_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, tok = generate.load("weights-code")
    assert model.checkpoint_dir == HERE / "weights-code" and tok.vocab_size == 8192
    rc, out, err = cli("--model", "weights-code", "--max-new-tokens", 4, "--quiet", "x", cwd=tmp_path)
    assert rc == 0 and out.startswith("x"), err


@pytest.mark.parametrize("kwargs,flags,needle", [
    (dict(chat=ChatFormat(thinking=True)), ["--thinking"], "has no chat format"),
    (dict(chat=ChatFormat(system="Be brief.")), ["--system", "Be brief."], "has no chat format"),
    (dict(steps=0), ["--steps", "0"], "greater than 0"),
    (dict(max_new_tokens=-3), ["--max-new-tokens", "-3"], "greater than 0"),
    (dict(entropy_bound=0.0), ["--entropy-bound", "0"], "greater than 0"),
    (dict(batch_size=0), ["--batch-size", "0"], "greater than 0"),
    (dict(prompt=""), [""], "is empty")])
def test_the_api_refuses_what_the_command_line_refuses(kwargs, flags, needle, capsys):
    model, tok = generate.load("weights-code")
    prompt = kwargs.pop("prompt", "Plan a trip")
    with pytest.raises(sampler.RequestError, match=needle):
        generate.generate(model, tok, prompt, **kwargs)
    try:
        rc = generate.run(["--model", "weights-code", *flags, *([] if prompt == "" else [prompt])])
    except SystemExit as e:  # argparse's own refusal
        rc = e.code
    assert_one_line_error(rc, capsys.readouterr().err, 2, needle)


def test_the_api_refuses_a_text_prompt_to_the_sudoku_model_and_a_prompt_that_is_not_text(capsys):
    model, tok = generate.load()
    with pytest.raises(sampler.RequestError, match="is a Sudoku model"):
        generate.generate(model, tok, "Why is the sky blue?")
    rc, _, err = in_process(capsys, "Why is the sky blue?")
    assert_one_line_error(rc, err, 2, "is a Sudoku model", "--model weights-code")
    code, tok = generate.load("weights-code")
    for bad in (123, None, [1, 2], []):
        with pytest.raises(sampler.RequestError, match="must be a string or a non-empty list of strings"):
            generate.generate(code, tok, bad)
    with pytest.raises(sampler.RequestError, match="raw prompt"):
        generate.generate(code, tok, "x", chat=ChatFormat(raw=True, thinking=True))
    with pytest.raises(TypeError):  # a misspelt setting is an error, not a silent default
        generate.settings_for(code, max_steps=3)


def test_print_prompt_with_a_repo_id_reads_no_weights(tmp_path, monkeypatch, capsys):
    """--print-prompt downloads the configs, the tokenizer and the template, never the safetensors;
    a later run that needs the weights does not take that snapshot for a whole one."""
    import huggingface_hub
    asked = []

    def fake_download(repo_id, allow_patterns=None, **kw):
        asked.append(allow_patterns)
        snap = tmp_path / "hub" / "models--someone--m" / "snapshots" / "r1"
        snap.mkdir(parents=True, exist_ok=True)
        for f in (HERE / "weights-code").iterdir():
            if not f.name.endswith(".safetensors") or "*.safetensors" in allow_patterns:
                shutil.copy(f, snap / f.name)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    rc, out, err = in_process(capsys, "--model", "someone/m", "--print-prompt", "def f(x):")
    assert rc == 0 and out.strip() == "def f(x):", err
    assert asked == [["*.json", "tokenizer*", "*.jinja"]]
    rc, out, err = in_process(capsys, "--model", "someone/m", "--max-new-tokens", 4, "--quiet", "x")
    assert rc == 0 and asked[-1] == ["*.json", "tokenizer*", "*.jinja", "*.safetensors"], err


def test_an_accept_command_that_cannot_run(capsys):
    rc, out, err = in_process(capsys, "--model", "weights-code", "--samples", 2, "--accept", "/no/such/cmd",
                              "--max-new-tokens", 4, "x")
    assert rc == 2 and out == "" and "could not be run (exit 127" in err and "larger N" not in err, err


@pytest.mark.slow
def test_infill_at_the_top_of_a_file(capsys):
    """An empty left side is a gap after <bos> alone (the command line, Python and the server agree)."""
    model, tok = generate.load("weights-code")
    text = generate.infill(model, tok, "<FILL>\nprint(1)\n", fill_length=6, seed=3)
    rc, out, err = in_process(capsys, "--model", "weights-code", "--infill", "<FILL>\nprint(1)\n", "--fill-length", 6,
                              "--seed", 3, "--quiet")
    assert rc == 0 and out == text + "\nprint(1)\n\n", (out, text, err)
