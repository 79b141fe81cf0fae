"""Attention pieces against hand-written values: RoPE tables (default and proportional), the causal
mask with a window and padding, and the canvas attention against SDPA over the concatenation."""

import math

import pytest
import torch

from attention import Attention, attend, canvas_attention, causal_mask, rope_cos_sin, rope_inv_freq
from kvcache import KVCache, LayerCache


def test_default_rope_table():
    # head_dim 4, theta 10000: frequencies 1 and 1/100
    inv = rope_inv_freq(4, 10000.0, "default")
    torch.testing.assert_close(inv, torch.tensor([1.0, 0.01]))
    cos, sin = rope_cos_sin(inv, torch.tensor([[0, 1, 2]]), torch.float32)
    assert cos.shape == (1, 3, 4)
    # half-split layout: dims (0, 2) share frequency 1, dims (1, 3) share 1/100
    torch.testing.assert_close(cos[0, 1], torch.tensor([0.5403023, 0.99995, 0.5403023, 0.99995]))
    torch.testing.assert_close(sin[0, 1], torch.tensor([0.8414710, 0.00999983, 0.8414710, 0.00999983]))
    torch.testing.assert_close(cos[0, 2, 0], torch.tensor(-0.4161468))
    torch.testing.assert_close(cos[0, 0], torch.ones(4))


def test_proportional_rope_table():
    # head_dim 8, factor 0.5, theta 1e6: int(0.5 * 8 // 2) = 2 rotating pairs with 1/theta^(2i/8)
    # (denominator = the full head_dim 8), the other 2 pairs have frequency 0
    inv = rope_inv_freq(8, 1e6, "proportional", 0.5)
    torch.testing.assert_close(inv, torch.tensor([1.0, 1e6 ** -0.25, 0.0, 0.0]))
    cos, sin = rope_cos_sin(inv, torch.tensor([[5]]), torch.float32)
    torch.testing.assert_close(cos[0, 0], torch.tensor([math.cos(5), math.cos(5 * 1e6 ** -0.25), 1.0, 1.0] * 2))
    torch.testing.assert_close(sin[0, 0, 2:4], torch.zeros(2))
    # released shape: head_dim 512, factor 0.25 -> 64 rotating pairs; dims 0-63 and 256-319 rotate
    inv = rope_inv_freq(512, 1e6, "proportional", 0.25)
    assert inv.shape == (256,) and (inv[:64] > 0).all() and (inv[64:] == 0).all()
    torch.testing.assert_close(inv[1], torch.tensor(1e6 ** (-2 / 512)))


def test_causal_mask_sliding_and_padding():
    cache = KVCache(["sliding_attention", "full_attention"], sliding_window=3)
    cache.extend_valid(torch.tensor([[False, True, True, True]]), 1, 4, "cpu")
    # keys 0..3 (key 0 is padding), window 3: q sees k in (q-3, q]
    assert causal_mask(cache, 0, 4, 3, "cpu")[0, 0].int().tolist() == [[0, 0, 0, 0],
                                                                       [0, 1, 0, 0],
                                                                       [0, 1, 1, 0],
                                                                       [0, 1, 1, 1]]
    m_full = causal_mask(cache, 1, 4, None, "cpu")[0, 0].int().tolist()
    assert m_full[3] == [0, 1, 1, 1] and m_full[1] == [0, 1, 0, 0]


@pytest.mark.parametrize("padded", [False, True])
def test_canvas_attention_is_attention_over_the_concatenation(padded):
    torch.manual_seed(0)
    B, H, Hkv, Tc, C, d = 2, 4, 2, 5, 3, 8
    q = torch.randn(B, H, C, d)
    kc, vc, kn, vn = torch.randn(B, Hkv, Tc, d), torch.randn(B, Hkv, Tc, d), torch.randn(B, Hkv, C, d), torch.randn(B, Hkv, C, d)
    valid = torch.tensor([[True] * Tc, [False, False] + [True] * (Tc - 2)]) if padded else None
    got = canvas_attention(q, kc, vc, kn, vn, valid)
    # by hand: softmax over the allowed keys of q.k (scale 1), grouped heads share a kv head
    k_all, v_all = torch.cat([kc, kn], 2), torch.cat([vc, vn], 2)
    for b in range(B):
        for h in range(H):
            scores = q[b, h] @ k_all[b, h // 2].T  # (C, Tc + C)
            if padded and b == 1:
                scores[:, :2] = float("-inf")
            torch.testing.assert_close(got[b, h], scores.softmax(-1) @ v_all[b, h // 2], atol=1e-5, rtol=1e-5)
    assert torch.equal(canvas_attention(q, None, None, kn, vn, None), attend(q, kn, vn, None))


def test_attention_modes_agree():
    """A canvas pass over [cache ; x] with everything visible equals a causal pass without a mask."""
    torch.manual_seed(1)
    attn = Attention(32, 4, 2, 8, k_eq_v=True, eps=1e-6)
    cos, sin = rope_cos_sin(rope_inv_freq(8, 1e4, "default"), torch.arange(6)[None], torch.float32)
    x = torch.randn(1, 6, 32)
    cache = LayerCache(None)
    attn(x[:, :4], cos[:, :4], sin[:, :4], cache, None, "causal")
    canvas = attn(x[:, 4:], cos[:, 4:], sin[:, 4:], cache, None, "canvas")
    everything = attn(x, cos, sin, None, None, "causal")  # no mask: every query sees every key
    torch.testing.assert_close(canvas, everything[:, 4:], atol=1e-5, rtol=1e-5)
    assert len(cache) == 4  # the canvas pass did not write
