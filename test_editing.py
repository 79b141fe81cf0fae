"""Canvas editing: pinned positions come back unchanged and are never renoised (checked on the sampler
state at every step), infill, templates with holes, and best-of-N with a check that accepts a sample."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from editing import Canvas, fill, parse_infill, parse_template
from generate import fill_template, infill, load, settings_for
from sampler import block_diffusion

HERE = Path(__file__).resolve().parent
CODE_MODEL = HERE / "weights-code"


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

    settings = settings_for(model, max_new_tokens=max_new_tokens, steps=steps, eos_token_ids=())
    torch.manual_seed(0)
    result = block_diffusion(model, [prompt], settings, pins=[pins], on_step=on_step)
    assert len(seen) >= len(pins)
    new = result.sequences[0, len(prompt):].tolist()
    assert all(new[offset] == tok for offset, tok in pins.items())
    return result


def test_pins_tiny_random_model(chat_free_ckpt):
    model, tok = load(chat_free_ckpt, device="cpu", dtype=torch.float32)
    C = model.config.canvas_length
    check_pins_every_step(model, [5, 6, 7, 8, 9], {0: 7, 3: 11, C + 2: 13, 2 * C - 1: 17}, 2 * C, steps=4)


def test_pins_bundled_model():
    model, tok = load(CODE_MODEL, device="cpu")
    close, colon = tok.encode(")")[0], tok.encode(":")[0]
    prompt = tok.encode_raw("def area(width, height")
    result = check_pins_every_step(model, prompt, {0: close, 1: colon}, 16, steps=4)
    assert tok.decode(result.sequences[0, len(prompt): len(prompt) + 2].tolist()) == "):"


def test_template_parsing(chat_free_ckpt):
    _, tok = load(chat_free_ckpt, device="cpu", dtype=torch.float32)
    a, b = tok.encode("def add("), tok.encode("):")
    canvas = parse_template(tok, "def add(__):_")
    assert canvas.length == len(a) + 2 + len(b) + 1
    assert canvas.pins == {**dict(enumerate(a)), **{len(a) + 2 + i: t for i, t in enumerate(b)}}
    assert parse_template(tok, "x#y", hole="#").length == len(tok.encode("x")) + 1 + len(tok.encode("y"))
    left, gap = parse_infill(tok, "def f(<FILL>):", 3)
    assert left == tok.encode_raw("def f(") and gap == Canvas(3 + len(b), {3 + i: t for i, t in enumerate(b)})


@pytest.mark.slow
def test_infill_and_template_api_and_cli(chat_free_ckpt):
    model, tok = load(chat_free_ckpt, device="cpu", dtype=torch.float32)
    assert isinstance(infill(model, tok, "def add(a, b):<FILL>    return a + b\n", fill_length=6, steps=3, seed=0), str)
    text = fill_template(model, tok, "def add(a, b):\n    return ____\n", steps=3, seed=0)
    assert text.startswith("def add(a, b):\n    return ") and text.endswith("\n")
    p = subprocess.run([sys.executable, "generate.py", "--model", str(chat_free_ckpt), "--infill",
                        "def add(a, b):<FILL>    return a + b", "--fill-length", "5", "--steps", "3"],
                       cwd=HERE, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("def add(a, b):") and p.stdout.rstrip("\n").endswith("    return a + b")
    p = subprocess.run([sys.executable, "generate.py", "--model", str(chat_free_ckpt), "--template", "for i in ###:",
                        "--hole", "#", "--steps", "3"], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith("for i in ") and p.stdout.rstrip("\n").endswith(":"), p.stderr


@pytest.mark.slow
def test_pin_closing_token_cli(chat_free_ckpt):
    p = subprocess.run([sys.executable, "generate.py", "--model", str(chat_free_ckpt), "--max-new-tokens", "12",
                        "--pin", "11:)", "--steps", "3", "--raw", "print("],
                       cwd=HERE, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.rstrip("\n").endswith(")")


@pytest.mark.slow
def test_best_of_n_picks_the_first_accepted(chat_free_ckpt):
    model, tok = load(chat_free_ckpt, device="cpu", dtype=torch.float32)
    canvas = parse_template(tok, "x = ______")
    torch.manual_seed(0)
    tokens, ok, result = fill(model, [2], canvas, settings_for(model, steps=2), samples=6,
                              accept=lambda t: t[-1] % 2 == 0)
    assert len(tokens) == 6 and result.sequences.shape[0] == 6  # one batch of 6
    assert ok == [t[-1] % 2 == 0 for t in tokens] and 0 < sum(ok) < 6  # some pass, some do not
    wanted = tok.decode(tokens[ok.index(True)])
    seen = []
    torch.manual_seed(0)  # the same draws: the API sees the same six samples, as text
    assert fill_template(model, tok, "x = ______", steps=2, samples=6,
                         accept=lambda text: seen.append(text) or text == wanted) == wanted
    assert len(seen) == 6 and seen[ok.index(True)] == wanted
    assert fill_template(model, tok, "x = ______", steps=2, samples=2, accept=lambda text: False) is None
    # through the command line: a shell check on stdin, the closing line counts what passed
    p = subprocess.run([sys.executable, "generate.py", "--model", str(chat_free_ckpt), "--template", "x = ______",
                        "--samples", "6", "--accept", "grep -q 'x = '", "--steps", "2"],
                       cwd=HERE, capture_output=True, text=True, timeout=120)
    # printed as samples are without --accept: headed by its label, the continuation alone
    assert p.returncode == 0 and p.stdout.startswith("=== sample 1 (accepted)\nx = "), p.stdout
    assert "6 of 6 samples accepted by grep" in p.stderr, p.stderr
    p = subprocess.run([sys.executable, "generate.py", "--model", str(chat_free_ckpt), "--template", "x = ______",
                        "--samples", "3", "--accept", "false", "--steps", "2"],
                       cwd=HERE, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stdout == "" and "0 of 3 samples accepted by false" in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: none of the 3 samples was accepted by false")
