"""The command line: a real run end to end, the chat format, and every user mistake as one clear line."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import GEMMA4_TOKENIZER

HERE = Path(__file__).resolve().parent


def cli(*args, cwd=HERE, timeout=120):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, str(HERE / "generate.py"), *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=timeout, env=env)
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(rc, err, code, *needles):
    assert rc == code, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in err, err


def test_generates_end_to_end(chat_free_ckpt):
    rc, out, err = cli("--model", chat_free_ckpt, "--max-new-tokens", 10, "--steps", 3, "--seed", 1, "def add")
    assert rc == 0, err
    assert out.endswith("\n") and "Traceback" not in err
    closing = err.strip().splitlines()[-1]
    assert "canvases" in closing and "tok/s" in closing and "device cpu" in closing
    # the same seed gives the same text; another seed another
    rc2, out2, _ = cli("--model", chat_free_ckpt, "--max-new-tokens", 10, "--steps", 3, "--seed", 1, "def add")
    assert out2 == out


def test_python_api_and_exact_max_new_tokens(chat_free_ckpt):
    from generate import block_diffusion, generate, load, settings_for
    model, tok = load(chat_free_ckpt, device="cpu", dtype=torch.float32)
    texts = generate(model, tok, ["def add", "the quick brown fox jumps"], max_new_tokens=11, steps=2, seed=0)
    assert isinstance(texts, list) and len(texts) == 2
    ids = [tok.prompt_ids("for i in", chat=False)]
    settings = settings_for(model, max_new_tokens=11, steps=2)
    settings.eos_token_ids = ()  # no early stop: the budget alone decides the length
    torch.manual_seed(0)
    r = block_diffusion(model, ids, settings)
    assert r.sequences.shape[1] == len(ids[0]) + 16  # two whole canvases of 8 were generated ...
    assert len(r.tokens[0]) == 11  # ... and trimmed to exactly 11 tokens


def test_batch_file(chat_free_ckpt, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("def add\nthe quick brown\n\nfor i in\n", encoding="utf-8")
    rc, out, err = cli("--model", chat_free_ckpt, "--batch-file", f, "--max-new-tokens", 8, "--steps", 2)
    assert rc == 0, err
    assert out.count("=== ") == 3


def test_show_canvas(chat_free_ckpt):
    rc, out, err = cli("--model", chat_free_ckpt, "--show-canvas", "--max-new-tokens", 8, "--steps", 3, "x")
    assert rc == 0, err
    assert "canvas 1 · step 3" in err and "\033[" in err


@pytest.mark.skipif(not GEMMA4_TOKENIZER.exists(), reason="the Gemma 4 tokenizer fixture is not beside the repo")
def test_chat_format_real_ids():
    from generate import Tokenizer
    tok = Tokenizer(GEMMA4_TOKENIZER)
    assert tok.is_chat
    ids = tok.prompt_ids("Why is the sky blue?", chat=True)
    assert ids == [2, 105, 2364, 107, 11355, 563, 506, 7217, 3730, 236881, 106, 107, 105, 4368, 107, 100, 45518, 107, 101]
    thinking = tok.prompt_ids("Why is the sky blue?", chat=True, thinking=True)
    assert thinking[:4] == [2, 105, tok.tok.token_to_id("system") or thinking[2], 107]
    assert 98 in thinking and 100 not in thinking[-4:]  # <|think|>, and no closed empty thought block
    assert thinking[-3:] == [105, 4368, 107]
    assert tok.prompt_ids("Why is the sky blue?", chat=False) == [2, 11355, 563, 506, 7217, 3730, 236881]


# ---- user mistakes: one line, no traceback ------------------------------------------------------

def broken_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_path(tmp_path):
    rc, _, err = cli("--model", tmp_path / "nope", "hi")
    assert_one_line_error(rc, err, 1, "does not exist")


def test_no_config_json(tmp_path):
    rc, _, err = cli("--model", tmp_path, "hi")
    assert_one_line_error(rc, err, 1, "no config.json")


def test_other_model_type(chat_free_ckpt, tmp_path):
    d = broken_copy(chat_free_ckpt, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gemma4"
    (d / "config.json").write_text(json.dumps(cfg))
    rc, _, err = cli("--model", d, "hi")
    assert_one_line_error(rc, err, 1, "'gemma4'", "diffusion_gemma")


def test_truncated_safetensors(chat_free_ckpt, tmp_path):
    d = broken_copy(chat_free_ckpt, tmp_path / "c")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    rc, _, err = cli("--model", d, "hi")
    assert_one_line_error(rc, err, 1, "model.safetensors", "truncated or corrupted")


def test_corrupted_safetensors_header(chat_free_ckpt, tmp_path):
    d = broken_copy(chat_free_ckpt, tmp_path / "c")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32
    f.write_bytes(bytes(data))
    rc, _, err = cli("--model", d, "hi")
    assert_one_line_error(rc, err, 1, "model.safetensors", "truncated or corrupted")


def rewrite_weights(d: Path, change):
    from safetensors.torch import load_file, save_file
    tensors = load_file(d / "model.safetensors")
    change(tensors)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(chat_free_ckpt, tmp_path):
    d = broken_copy(chat_free_ckpt, tmp_path / "c")
    rewrite_weights(d, lambda t: t.pop("model.decoder.layers.1.experts.down_proj"))
    rc, _, err = cli("--model", d, "hi")
    assert_one_line_error(rc, err, 1, "model.decoder.layers.1.experts.down_proj", "missing", "model.safetensors")


def test_misshaped_tensor(chat_free_ckpt, tmp_path):
    d = broken_copy(chat_free_ckpt, tmp_path / "c")
    name = "model.decoder.layers.0.self_attn.q_proj.weight"
    rewrite_weights(d, lambda t: t.__setitem__(name, t[name][:-1].clone()))
    rc, _, err = cli("--model", d, "hi")
    assert_one_line_error(rc, err, 1, name, "model.safetensors", "shape")


def test_empty_prompt(chat_free_ckpt):
    rc, _, err = cli("--model", chat_free_ckpt, "   ")
    assert_one_line_error(rc, err, 2, "prompt is empty")


def test_prompt_longer_than_context(chat_free_ckpt, tmp_path):
    d = broken_copy(chat_free_ckpt, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    rc, _, err = cli("--model", d, "--max-new-tokens", 8, "the quick brown fox " * 30)
    assert_one_line_error(rc, err, 2, "positions", "64", "shorten")


@pytest.mark.parametrize("flag,value", [("--steps", "0"), ("--steps", "-3"), ("--max-new-tokens", "0"),
                                        ("--max-new-tokens", "-1"), ("--entropy-bound", "-0.5"),
                                        ("--steps", "many")])
def test_bad_numbers(chat_free_ckpt, flag, value):
    rc, _, err = cli("--model", chat_free_ckpt, flag, value, "hi")
    assert_one_line_error(rc, err, 2, flag)


def test_batch_file_not_utf8(chat_free_ckpt, tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("café\n".encode("latin-1"))
    rc, _, err = cli("--model", chat_free_ckpt, "--batch-file", f)
    assert_one_line_error(rc, err, 2, "not UTF-8")


def test_no_model_anywhere(tmp_path):
    """Without --model, generate.py uses ./weights; a copy of the program without it says what to do."""
    for f in HERE.glob("*.py"):
        shutil.copy(f, tmp_path / f.name)
    shutil.copytree(HERE / "cuda_kernels", tmp_path / "cuda_kernels")
    p = subprocess.run([sys.executable, str(tmp_path / "generate.py")], capture_output=True, text=True, cwd=tmp_path)
    assert_one_line_error(p.returncode, p.stderr, 2, "no model given", "--model")


def test_bare_generate_runs_bundled_model_quickly():
    """README's first command: `python generate.py` with no arguments, on the bundled model, on the
    CPU, in under a minute (the bar for two CPU cores)."""
    import time
    assert (HERE / "weights" / "config.json").exists(), "the bundled model is missing from weights/"
    t = time.perf_counter()
    p = subprocess.run([sys.executable, str(HERE / "generate.py"), "--device", "cpu"], cwd=HERE,
                       capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t
    assert p.returncode == 0, p.stderr
    closing = p.stderr.strip().splitlines()[-1]
    assert "canvases" in closing and "device cpu" in closing and p.stdout.strip()
    assert elapsed < 60, f"took {elapsed:.1f} s"


def test_repo_id_found_in_hf_cache(chat_free_ckpt, tmp_path):
    """--model ORG/NAME is looked up in HF_HUB_CACHE (models--ORG--NAME/snapshots/<rev>/, refs/main)."""
    repo = tmp_path / "hub" / "models--someone--tiny-diffusiongemma"
    shutil.copytree(chat_free_ckpt, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, str(HERE / "generate.py"), "--model", "someone/tiny-diffusiongemma",
                        "--max-new-tokens", "4", "--steps", "2", "hi"], cwd=HERE, capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    # a repo id that is not in the cache and cannot be downloaded: one line saying what to do
    p = subprocess.run([sys.executable, str(HERE / "generate.py"), "--model", "someone/absent-model", "hi"],
                       cwd=HERE, capture_output=True, text=True, env=env, timeout=120)
    assert_one_line_error(p.returncode, p.stderr, 1, "someone/absent-model", "--model DIR")
