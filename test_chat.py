"""Multi-turn chat: after each turn the KV cache holds what one causal pass over the rendered
conversation would hold (sliding layers included), a turn reads only its new tokens, and --chat
works from a pipe with /reset and the end of input."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chat import Chat
from conftest import TEMPLATES, needs_gemma4
from generate import load
from kvcache import KVCache

HERE = Path(__file__).resolve().parent
pytestmark = needs_gemma4


def fresh_pass(model, ids: list[int]) -> KVCache:
    cache = KVCache(model.config.layer_types, model.config.sliding_window)
    model.forward_causal(torch.tensor([ids]), cache)
    return cache


def assert_same_cache(got: KVCache, want: KVCache):
    assert got.length == want.length
    for i, (a, b) in enumerate(zip(got.layers, want.layers)):
        (ka, va), (kb, vb) = a.read(), b.read()
        assert ka.shape == kb.shape, f"layer {i}"
        torch.testing.assert_close(ka, kb, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(va, vb, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("template", [None, "release-2026-06"])
def test_cache_after_two_turns_equals_a_fresh_pass(chat_ckpt, tmp_path, template):
    d = shutil.copytree(chat_ckpt, tmp_path / "c")
    if template:  # its generation prompt ends with an empty thought that the next rendering drops
        shutil.copy(TEMPLATES / f"{template}.jinja", d / "chat_template.jinja")
    model, tok = load(d, "cpu", torch.float32)
    C = model.config.canvas_length
    chat = Chat(model, tok, model.generation_settings.copy(max_new_tokens=C, steps=3), system="Be brief.")
    torch.manual_seed(0)
    chat.send("Why is the sky blue? Tell me in one line, please.")
    first = tok.apply_chat_template(chat.conversation()[:-1])
    assert chat.cached == first and len(first) > model.config.sliding_window  # the window is exercised
    assert_same_cache(chat.cache, fresh_pass(model, first))
    chat.send("And the sunset?")
    second = tok.apply_chat_template(chat.conversation()[:-1])
    assert chat.cached == second
    assert_same_cache(chat.cache, fresh_pass(model, second))
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b) if template else len(first)
    assert chat.last_read == len(second) - shared  # only what changed was read again
    assert chat.last_read < len(second) / 2


def test_long_reply_rolls_back_committed_canvases(chat_ckpt):
    """A reply of several canvases leaves all but the last in the cache; the next turn rolls them back."""
    model, tok = load(chat_ckpt, "cpu", torch.float32)
    C = model.config.canvas_length
    settings = model.generation_settings.copy(max_new_tokens=3 * C, steps=2, eos_token_ids=())
    chat = Chat(model, tok, settings)
    torch.manual_seed(1)
    chat.send("Count to twenty.")
    first = tok.apply_chat_template(chat.conversation()[:-1])
    assert chat.cache.length == len(first) + 2 * C  # two committed canvases were read back
    chat.send("Thanks.")
    second = tok.apply_chat_template(chat.conversation()[:-1])
    assert chat.cached[: len(second)] == second and len(chat.cached) == len(second) + 2 * C
    assert_same_cache(chat.cache, fresh_pass(model, chat.cached))


@pytest.mark.slow
def test_chat_from_a_pipe(chat_ckpt):
    p = subprocess.run([sys.executable, "generate.py", "--model", str(chat_ckpt), "--chat", "--steps", "2",
                        "--max-new-tokens", "8", "--system", "Be brief."], input="hi\nwhat is 2+2?\n/reset\nagain\n",
                       cwd=HERE, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    reads = [ln for ln in p.stderr.splitlines() if "new tokens read" in ln]
    assert len(reads) == 3 and "(conversation reset)" in p.stderr
    read = [int(ln.split("(")[1].split()[0]) for ln in reads]
    held = [int(ln.split(", ")[1].split()[0]) for ln in reads]
    assert read[0] == held[0] and read[1] < held[1] and read[2] == held[2]  # turn 2 reused the cache; /reset did not
    turns = [ln for ln in p.stdout.splitlines() if ln.startswith("> ")]
    assert turns == ["> hi", "> what is 2+2?", "> again"] and p.stdout.count("\n") == 6  # each turn, then its reply
    p = subprocess.run([sys.executable, "generate.py", "--model", str(chat_ckpt), "--chat"], input="",
                       cwd=HERE, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0 and p.stdout == ""  # Ctrl-D (end of input) at once
