"""Training: the block-causal mask by hand, a step lowers the loss, a micro model overfits one batch,
saves survive a kill, and a model trained by train.py is written, loaded by generate.py and by
transformers, and generates."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from conftest import test_config
from model import DiffusionGemma, init_weights


HERE = Path(__file__).resolve().parent


def test_block_causal_mask_by_hand():
    # prefix 2, two blocks of 2: clean positions 0..5, noised positions 2..5 (blocks {2,3} and {4,5})
    m = train.training_mask(prefix=2, n_blocks=2, C=2, window=None).int().tolist()
    expected = [
        # clean 0..5           noised 2 3 4 5
        [1, 0, 0, 0, 0, 0,     0, 0, 0, 0],  # clean 0
        [1, 1, 0, 0, 0, 0,     0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0,     0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0,     0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0,     0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1,     0, 0, 0, 0],  # clean 5
        [1, 1, 0, 0, 0, 0,     1, 1, 0, 0],  # noised 2: the prompt, its own block
        [1, 1, 0, 0, 0, 0,     1, 1, 0, 0],  # noised 3
        [1, 1, 1, 1, 0, 0,     0, 0, 1, 1],  # noised 4: prompt + clean block 0, its own block
        [1, 1, 1, 1, 0, 0,     0, 0, 1, 1],  # noised 5
    ]
    assert m == expected
    w = train.training_mask(prefix=2, n_blocks=2, C=2, window=3).int().tolist()
    assert w[5][:6] == [0, 0, 0, 1, 1, 1]  # clean 5 sees 3..5
    assert w[8][:6] == [0, 0, 1, 1, 0, 0]  # block 1 starts at 4: clean keys 2..3 (anchored at the block)
    assert w[6][:6] == [1, 1, 0, 0, 0, 0]
    # without the AR loss the last clean block is left out: its rows and columns go, nothing else moves
    short = train.training_mask(prefix=2, n_blocks=2, C=2, window=None, clean_blocks=1).int().tolist()
    keep = [0, 1, 2, 3, 6, 7, 8, 9]
    assert short == [[expected[r][c] for c in keep] for r in keep]


def tiny_model(seed=0):
    cfg = test_config("tiny", vocab_size=64)
    torch.manual_seed(seed)
    return init_weights(DiffusionGemma(cfg), std=0.05, seed=seed).train().requires_grad_(True)


def fixed_batch(V=64, B=4, L=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, V, (B, L), generator=g)


def test_one_step_lowers_the_loss():
    model = tiny_model()
    batch = fixed_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(2):
        loss, _, _ = train.loss_fn(model, batch, 24, torch.Generator().manual_seed(1), 0.5, 0.5)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[1] < losses[0]


def test_micro_model_overfits_one_batch():
    model = tiny_model(1)
    batch = fixed_batch(B=2, L=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for i in range(80):
        loss, diff, ar = train.loss_fn(model, batch, 16, torch.Generator().manual_seed(i % 4), 0.5, 0.5)
        first = first if first is not None else diff.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"diffusion loss {first:.3f} -> {diff.item():.3f}, ar {ar.item():.3f}")
    assert first > 3.5 and diff.item() < 1.0 and ar.item() < 1.0


@pytest.mark.slow
def test_self_conditioning_is_trained():
    """With sc_prob 1 the self-conditioning MLP gets a gradient; with 0 it gets none."""
    batch = fixed_batch(B=2, L=32)
    for prob, expect in ((1.0, True), (0.0, False)):
        model = tiny_model()
        loss, _, _ = train.loss_fn(model, batch, 16, torch.Generator().manual_seed(0), 0.0, prob)
        loss.backward()
        g = model.self_conditioning.gate_proj.weight.grad
        assert (g is not None and g.abs().sum() > 0) == expect


def run(*args, timeout=300):
    p = subprocess.run([sys.executable, *map(str, args)], cwd=HERE, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-2000:]
    return p


@pytest.mark.slow
def test_train_save_load_generate_round_trip(tmp_path):
    out, ckpt = tmp_path / "run", tmp_path / "ckpt"
    run("train.py", "--preset", "tiny", "--max-files", "3", "--out", out, "--steps", "3", "--batch", "2",
        "--prefix", "16", "--eval-every", "2")
    assert "heldout@0.5" in (out / "log.txt").read_text()
    run("train.py", "--preset", "tiny", "--max-files", "3", "--out", out, "--steps", "5", "--batch", "2",
        "--prefix", "16")  # resumes at step 3
    import json
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [e["step"] for e in log] == [2, 3, 5] and log[-1]["tokens"] == 5 * 2 * (16 + 2 * 8)
    run("train.py", "--preset", "tiny", "--out", out, "--export", ckpt)
    again = subprocess.run([sys.executable, "train.py", "--preset", "tiny", "--out", out, "--export", ckpt], cwd=HERE,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--force" in again.stderr  # an existing directory is never overwritten
    run("train.py", "--preset", "tiny", "--out", out, "--export", ckpt, "--force")
    for f in ("config.json", "generation_config.json", "tokenizer.json", "model.safetensors", "manifest.txt"):
        assert (ckpt / f).exists(), f
    p = run("generate.py", "--model", ckpt, "--max-new-tokens", "12", "--steps", "3", "def f(x):")
    assert "canvases" in p.stderr.strip().splitlines()[-1] and p.stdout.endswith("\n")
    # the checkpoint written here loads in transformers and gives the same logits
    transformers = pytest.importorskip("transformers")
    from generate import load
    from kvcache import KVCache
    ours, _ = load(ckpt, device="cpu", dtype=torch.float32)
    hf = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(ckpt, dtype=torch.float32).eval()
    prompt, canvas = torch.arange(5, 30)[None], torch.arange(40, 48)[None]
    with torch.no_grad():
        ref = hf(input_ids=prompt, decoder_input_ids=canvas).logits
        cache = KVCache(ours.config.layer_types, ours.config.sliding_window)
        ours.forward_causal(prompt, cache)
        got = ours.forward_canvas(canvas, cache)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_a_kill_mid_save_keeps_the_previous_state(tmp_path, monkeypatch):
    """A save killed while writing (or before its rename) leaves the last complete state, and
    training resumes from it."""
    path = tmp_path / "state.pt"
    train.save_state(path, {"step": 1})
    real_save = torch.save

    def killed_while_writing(obj, f):
        real_save({"step": "half"}, f)
        with open(f, "r+b") as fh:
            fh.truncate(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        train.save_state(path, {"step": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path)["step"] == 1
    train.save_state(path, {"step": 3})
    assert torch.load(path)["step"] == 3


@pytest.mark.slow
def test_resumes_after_a_kill(tmp_path):
    """SIGKILL a run at a chosen point (just after a save), then run again: it continues from there."""
    out = tmp_path / "run"
    args = [sys.executable, "train.py", "--preset", "tiny", "--max-files", "3", "--out", str(out), "--batch", "2",
            "--prefix", "16", "--eval-every", "2", "--quiet"]
    code = ("import os, signal, runpy, sys, train; real = train.save_state\n"
            "def save(path, state):\n    real(path, state)\n"
            "    if state['step'] == 4: os.kill(os.getpid(), signal.SIGKILL)\n"
            "train.save_state = save; sys.argv = ['train.py'] + sys.argv[1:]; sys.exit(train.main(train.build_parser().parse_args()))")
    p = subprocess.run([sys.executable, "-c", code, *args[2:], "--steps", "8"], cwd=HERE, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == -9  # killed
    assert torch.load(out / "state.pt")["step"] == 4
    run(*args[1:], "--steps", "6")
    assert torch.load(out / "state.pt")["step"] == 6
