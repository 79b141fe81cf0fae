"""Canvas editing: pinned positions come back unchanged and are never renoised (checked on the sampler
state at every step), infill through the CLI and the API, with a tiny random model and the bundled one."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from generate import DEFAULT_MODEL_DIR, block_diffusion, infill, load, settings_for

HERE = Path(__file__).resolve().parent


def check_pins_every_step(model, prompt, pins: dict[int, int], max_new_tokens: int, steps: int):
    """Run with pins, asserting at every denoising step that pinned positions hold their tokens
    and were accepted (so never renoised); return the result."""
    C = model.config.canvas_length
    seen = []

    def on_step(ci, step, state):
        for offset, tok in pins.items():
            if ci * C <= offset < (ci + 1) * C:
                j = offset - ci * C
                assert state.canvas[0, j] == tok and state.argmax[0, j] == tok
                assert state.accepted[0, j]  # accepted => not renoised
                seen.append((ci, step, j))

    settings = settings_for(model, max_new_tokens=max_new_tokens, steps=steps)
    settings.eos_token_ids = ()
    torch.manual_seed(0)
    result = block_diffusion(model, [prompt], settings, pins=[pins], on_step=on_step)
    assert len(seen) >= len(pins)
    new = result.sequences[0, len(prompt):].tolist()
    for offset, tok in pins.items():
        assert new[offset] == tok
    return result


def test_pins_tiny_random_model(chat_free_ckpt):
    model, tok = load(chat_free_ckpt, device="cpu", dtype=torch.float32)
    C = model.config.canvas_length
    pins = {0: 7, 3: 11, C + 2: 13, 2 * C - 1: 17}  # in two canvases, at both ends
    check_pins_every_step(model, [5, 6, 7, 8, 9], pins, 2 * C, steps=4)


def test_infill_api_and_cli(chat_free_ckpt):
    model, tok = load(chat_free_ckpt, device="cpu", dtype=torch.float32)
    fill = infill(model, tok, "def add(a, b):<FILL>    return a + b\n", fill_length=6, steps=3, seed=0)
    assert isinstance(fill, str)
    p = subprocess.run([sys.executable, "generate.py", "--model", str(chat_free_ckpt), "--infill",
                        "def add(a, b):<FILL>    return a + b", "--fill-length", "5", "--steps", "3"],
                       cwd=HERE, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("def add(a, b):") and p.stdout.rstrip("\n").endswith("    return a + b")
    bad = subprocess.run([sys.executable, "generate.py", "--model", str(chat_free_ckpt), "--infill", "no gap"],
                         cwd=HERE, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "<FILL>" in bad.stderr and "Traceback" not in bad.stderr


def test_pin_closing_token_cli(chat_free_ckpt):
    p = subprocess.run([sys.executable, "generate.py", "--model", str(chat_free_ckpt), "--max-new-tokens", "12",
                        "--pin", "11:)", "--steps", "3", "--raw", "print("],
                       cwd=HERE, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.rstrip("\n").endswith(")")


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").exists(), reason="no bundled model")
def test_pins_bundled_model():
    model, tok = load(DEFAULT_MODEL_DIR, device="cpu")
    close = tok.encode(")")[0]
    colon = tok.encode(":")[0]
    prompt = tok.prompt_ids("def area(width, height", chat=False)
    result = check_pins_every_step(model, prompt, {0: close, 1: colon}, 16, steps=4)
    assert tok.decode(result.sequences[0, len(prompt): len(prompt) + 2].tolist()) == "):"
