"""Quantization: hand-checked int8/int4 cases and error bounds, packing, and a checkpoint round trip
(quantize.py writes it atomically, the loader swaps in the quantized modules, generate.py runs it)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quant import QuantExperts, dequantize_buffers, dequantize_int4, dequantize_int8, quantize_int4, quantize_int8

HERE = Path(__file__).resolve().parent


def test_int8_by_hand():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.1]])
    q, s = quantize_int8(w)
    torch.testing.assert_close(s, torch.tensor([2 / 127, 0.1 / 127]))
    assert q.tolist() == [[64, -127, 32], [0, 0, 127]]  # 63.5 rounds to 64, 31.75 to 32
    back = dequantize_int8(q, s, torch.float32)
    assert ((back - w).abs() <= s[:, None] / 2 + 1e-7).all()
    assert back[1, 2].item() == pytest.approx(0.1)


def test_int4_by_hand_zero_point_and_symmetric():
    ramp = torch.arange(16.0) * 0.1 - 0.8  # -0.8 .. 0.7: scale 0.1, zero point 8, q = 0 .. 15
    packed, s, z = quantize_int4(ramp[None], group_size=16, zero_point=True)
    assert s.shape == (1, 1) and s.item() == pytest.approx(0.1) and z.item() == 8
    assert packed.shape == (1, 8) and packed[0, 0].item() == 0x10 and packed[0, -1].item() == 0xFE  # nibbles (0,1), (14,15)
    torch.testing.assert_close(dequantize_int4(packed, s, z, torch.float32)[0], ramp, atol=1e-6, rtol=0)
    packed, s, z = quantize_int4(ramp[None], group_size=16, zero_point=False)
    assert z.item() == 8 and s.item() == pytest.approx(0.8 / 7)
    back = dequantize_int4(packed, s, z, torch.float32)[0]
    assert ((back - ramp).abs() <= s.item() / 2 + 1e-6).all()


def test_int4_packing_order():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # lo 0 (the range holds 0), hi 4: scale 4/15
    packed, s, z = quantize_int4(w, group_size=4)
    q = torch.round(w / s) + z
    assert packed.tolist() == [[int(q[0, 0]) | int(q[0, 1]) << 4, int(q[0, 2]) | int(q[0, 3]) << 4]]


@pytest.mark.parametrize("group", [16, 64])
@pytest.mark.parametrize("zero_point", [True, False])
def test_error_bounds_random(group, zero_point):
    torch.manual_seed(group)
    w = torch.randn(3, 24, 128)  # stacked like the experts: (E, out, in)
    q8, s8 = quantize_int8(w)
    assert ((dequantize_int8(q8, s8, torch.float32) - w).abs() <= s8[..., None] / 2 + 1e-6).all()
    p, s, z = quantize_int4(w, group, zero_point)
    back = dequantize_int4(p, s, z, torch.float32)
    step = s.repeat_interleave(group, dim=-1)
    assert ((back - w).abs() <= step / 2 + 1e-5).all()
    rel = ((back - w).norm() / w.norm()).item()
    assert rel < (0.12 if zero_point else 0.15)


@pytest.mark.slow
def test_quantized_checkpoint_round_trip(chat_free_ckpt, tmp_path):
    from checkpoint import load_model
    dst = tmp_path / "q"
    p = subprocess.run([sys.executable, "quantize.py", str(chat_free_ckpt), str(dst), "--experts", "int4",
                        "--group-size", "16", "--attention", "int8", "--mlp", "none", "--embedding", "int8"],
                       cwd=HERE, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    block = json.loads((dst / "config.json").read_text())["quantization"]
    assert block["experts"] == "int4" and block["group_size"] == 16 and block["mlp"] is None
    assert (dst / "tokenizer.json").exists() and (dst / "generation_config.json").exists()
    ref = load_model(chat_free_ckpt, "cpu", torch.float32)
    qm = load_model(dst, "cpu", torch.float32)
    assert isinstance(qm.layers[0].experts, QuantExperts) and qm.layers[0].experts.kind == "int4"
    assert qm.layers[0].experts.gate_up_proj.dtype == torch.uint8
    # every dequantized weight is within its quantization step of the original
    gu, down = qm.layers[1].experts.expert_weights(2, torch.float32)
    torch.testing.assert_close(gu, ref.layers[1].experts.gate_up_proj[2], atol=0.05, rtol=0)
    wq = dequantize_buffers(qm.layers[0].self_attn.q_proj, "weight", "int8", torch.float32)
    assert (wq - ref.layers[0].self_attn.q_proj.weight).abs().max() < 0.01
    assert (qm.embedding_matrix() - ref.embed_tokens.weight).abs().max() < 0.01
    torch.testing.assert_close(qm.layers[0].mlp.gate_proj.weight, ref.layers[0].mlp.gate_proj.weight)  # untouched
    g = subprocess.run([sys.executable, "generate.py", "--model", str(dst), "--max-new-tokens", "8", "--steps", "2",
                        "def f"], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert g.returncode == 0, g.stderr
    again = subprocess.run([sys.executable, "quantize.py", str(dst), str(tmp_path / "qq")], cwd=HERE,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "already quantized" in again.stderr and not (tmp_path / "qq").exists()
    exists = subprocess.run([sys.executable, "quantize.py", str(chat_free_ckpt), str(dst)], cwd=HERE,
                            capture_output=True, text=True, timeout=60)
    assert exists.returncode == 2 and "--force" in exists.stderr and exists.stderr.count("\n") == 1


def test_interrupted_conversion_leaves_nothing(chat_free_ckpt, tmp_path, monkeypatch):
    import quantize
    from checkpoint import ShardWriter
    monkeypatch.setattr(ShardWriter, "close", lambda self: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        quantize.convert(chat_free_ckpt, tmp_path / "q", {"experts": "int8"})
    assert list(tmp_path.iterdir()) == []  # neither the destination nor a temporary directory


@pytest.mark.parametrize("group,needle", [("7", "does not divide the input size 128"), ("0", "greater than 0"),
                                          ("-64", "greater than 0"), ("512", "does not divide"), ("x", "not a whole")])
@pytest.mark.slow
def test_a_bad_group_size_is_one_line(group, needle, tmp_path):
    p = subprocess.run([sys.executable, "quantize.py", "weights-code", str(tmp_path / "q"), "--group-size", group],
                       cwd=HERE, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr, p.stderr
    assert not (tmp_path / "q").exists() and list(tmp_path.iterdir()) == []  # nothing written
    if "divide" in needle:
        assert "16, 32, 64, 128" in p.stderr  # what would work


def test_the_format_name_is_one_name():
    """hfconfig checks the quantization block without importing quant.py (a copied loader needs fewer files)."""
    import hfconfig
    import quant
    assert quant.FORMAT == hfconfig.QUANT_FORMAT


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_stack_quantized_in_slices_is_the_same_bits(kind):
    """quantized_copy quantizes a stack of experts 16 at a time (the fp32 temporaries of a slice, not
    of the stack): the same bits as all at once."""
    from quant import quantize, quantize_in_slices
    w = torch.randn(40, 24, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    whole, sliced = quantize(w, kind, 32, True), quantize_in_slices(w, kind, 32, True, experts=16)
    assert whole.keys() == sliced.keys() and all(torch.equal(whole[k], sliced[k]) for k in whole)
