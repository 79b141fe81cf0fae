"""Attention of DiffusionGemma: rotary embeddings, the attention block, and its two masks.

Follows transformers 5.17.0 `modeling_diffusion_gemma.py` (DiffusionGemma{Encoder,Decoder}TextAttention).

Per layer, with x of shape (B, S, hidden):
  q = RoPE(q_norm(q_proj(x)))                     one RMSNorm per head, over head_dim
  k = RoPE(k_norm(k_proj(x)))
  v = v_norm(v_proj(x))  on sliding layers        v_norm: RMSNorm without a weight
  v = v_norm(k_proj(x))  on full layers           "K = V": no v_proj, V is the raw K projection
  out = o_proj(softmax(q k^T * 1.0) v)            scale 1.0: the q/k norms replace 1/sqrt(d)

Two modes over one set of weights:
  causal    the prompt or a committed canvas; appends K/V to the cache; causal (+ window) mask
  canvas    the denoising pass over the 256-token canvas; attends to [cache ; canvas] with no mask
            at all (bidirectional, and sliding layers simply see what their cache holds)

Dims legend: B batch, S new tokens, T keys, H query heads, Hkv kv heads, d head_dim, C canvas.

    import torch; from attention import Attention, rope_cos_sin, rope_inv_freq; from kvcache import LayerCache
    attn = Attention(hidden_size=32, n_heads=4, n_kv_heads=2, head_dim=8, k_eq_v=False, eps=1e-6)
    cos, sin = rope_cos_sin(rope_inv_freq(8, 10000.0, "default"), torch.arange(5)[None], torch.float32)
    y = attn(torch.randn(1, 5, 32), cos, sin, LayerCache(None), None, "causal")   # (1, 5, 32)
"""

import torch
import torch.nn.functional as F
from torch import nn

from kvcache import KVCache, LayerCache


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32: x * (mean(x^2) + eps)^-0.5, times a plain weight (not 1 + w)."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            h = h * self.weight.float()
        return h.type_as(x)


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings
# ---------------------------------------------------------------------------------------------

def rope_inv_freq(head_dim: int, theta: float, rope_type: str, partial_rotary_factor: float = 1.0) -> torch.Tensor:
    """Inverse frequencies, (head_dim // 2,) fp32, on the CPU (the model moves them).

    default       1 / theta^(2i / head_dim) for every pair.
    proportional  only the first int(factor * head_dim // 2) pairs rotate, with 1 / theta^(2i / head_dim)
                  (the denominator is the FULL head_dim); the remaining pairs get frequency 0, so
                  cos = 1 and sin = 0 there. At head_dim 512, factor 0.25: 64 rotating pairs.
    """
    if rope_type == "default":
        dim = int(head_dim * partial_rotary_factor)
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))
    if rope_type == "proportional":
        n_rot = int(partial_rotary_factor * head_dim // 2)
        rotated = 1.0 / (theta ** (torch.arange(0, 2 * n_rot, 2, dtype=torch.int64, device="cpu").float() / head_dim))
        return torch.cat([rotated, torch.zeros(head_dim // 2 - n_rot, device="cpu")])
    raise ValueError(f"unsupported rope_type {rope_type!r}")


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables for positions (1, S): computed in fp32, then cast. Each (1, S, head_dim)."""
    freqs = (inv_freq[None, :, None].float().to(positions.device) @ positions[:, None, :].float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)  # half-split layout: pair i is (i, i + d/2)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim: the half-split rotation of RoPE."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, h, d); cos/sin (1, S, d)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


# ---------------------------------------------------------------------------------------------
# Masks (True = may attend)
# ---------------------------------------------------------------------------------------------

def causal_mask(cache: KVCache, layer_idx: int, n_new: int, sliding_window: int | None, device,
                blocks: torch.Tensor | None = None) -> torch.Tensor:
    """(B or 1, 1, S, T) mask for a causal pass of n_new tokens appended at position cache.length.

    Keys are the tokens this layer still holds plus the new ones. A query at position q sees key
    position p iff p <= q, and on sliding layers also p > q - sliding_window; padding is hidden.
    blocks (B, S): an image's tokens share a block number (>= 0, text -1) and see each other
    whatever their order or distance (transformers' use_bidirectional_attention="vision").
    """
    first = cache.first_cached_position(layer_idx)
    q_pos = torch.arange(cache.length, cache.length + n_new, device=device)  # (S,)
    k_pos = torch.arange(first, cache.length + n_new, device=device)  # (T,)
    mask = k_pos[None, :] <= q_pos[:, None]  # (S, T)
    if sliding_window is not None:
        mask = mask & (k_pos[None, :] > q_pos[:, None] - sliding_window)
    mask = mask[None, None]  # (1, 1, S, T)
    if blocks is not None:  # the cached keys are text (-1): an image is read in one pass
        k_blocks = F.pad(blocks, (len(k_pos) - n_new, 0), value=-1)  # (B, T)
        mask = mask | ((blocks[:, :, None] == k_blocks[:, None, :]) & (blocks[:, :, None] >= 0))[:, None]
    if cache.valid is not None:
        mask = mask & cache.valid[:, None, None, first: cache.length + n_new]  # (B, 1, S, T)
    return mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T) v with scale 1.0. q (B, H, S, d), k/v (B, Hkv, T, d) -> (B, H, S, d).

    Grouped-query heads go through SDPA's enable_gqa when there is no mask and d <= 256, else K/V
    are repeated per group: the same choice transformers makes, so the two give the same bits.
    """
    n_rep = q.shape[1] // k.shape[1]
    kwargs = {}
    if n_rep > 1:
        if mask is None and k.shape[-1] <= 256:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(n_rep, dim=1)  # (B, H, T, d)
            v = v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, **kwargs)


def canvas_attention(q: torch.Tensor, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
                     k_new: torch.Tensor, v_new: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The denoising pass's attention: every canvas query sees every cached key and every canvas key.

    q (B, H, C, d); k_cache/v_cache (B, Hkv, Tc, d) or None; k_new/v_new (B, Hkv, C, d);
    valid (B, Tc) bool or None (left padding). Returns (B, H, C, d). The specification that
    cuda_kernels.canvas_attention (reading the cache in place) must match.
    """
    k, v = k_new, v_new
    if k_cache is not None:
        k, v = torch.cat([k_cache, k_new], dim=2), torch.cat([v_cache, v_new], dim=2)  # (B, Hkv, Tc + C, d)
    mask = None
    if valid is not None:
        C = q.shape[2]
        mask = F.pad(valid, (0, C), value=True)[:, None, None, :].expand(-1, 1, C, -1)  # (B, 1, C, Tc + C)
    return attend(q, k, v, mask)


class Attention(nn.Module):
    """The attention block of one layer (K = V when k_eq_v: the full layers have no v_proj)."""
    def __init__(self, hidden_size: int, n_heads: int, n_kv_heads: int, head_dim: int, k_eq_v: bool, eps: float):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=False)
        self.v_proj = None if k_eq_v else nn.Linear(hidden_size, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)
        self.v_norm = RMSNorm(head_dim, eps, with_scale=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Projections, norms and RoPE. Returns q (B, H, S, d), k and v (B, Hkv, S, d)."""
        B, S, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, S, -1, self.head_dim))  # (B, S, H, d)
        q = apply_rope(q, cos, sin).transpose(1, 2)
        k_raw = self.k_proj(x).view(B, S, -1, self.head_dim)  # (B, S, Hkv, d)
        v = k_raw if self.v_proj is None else self.v_proj(x).view(B, S, -1, self.head_dim)
        k = apply_rope(self.k_norm(k_raw), cos, sin).transpose(1, 2)
        v = self.v_norm(v).transpose(1, 2)
        return q, k, v

    def forward(self, x, cos, sin, layer_cache: LayerCache | None, mask: torch.Tensor | None,
                mode: str) -> torch.Tensor:
        """x (B, S, hidden) -> (B, S, hidden).

        causal: mask (B or 1, 1, S, T) over [what the cache shows ; x]; appends x's K/V to the cache
                (layer_cache None: attend within x only, as training does).
        canvas: mask is the (B, T_cache) `valid` of KVCache.canvas_valid, or None; the cache is only read.
        """
        B, S, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if mode == "causal":
            if layer_cache is not None:
                k, v = layer_cache.append(k, v)  # the cache now holds them for every later pass
            y = attend(q, k, v, mask)  # (B, H, S, d)
        else:
            k_old, v_old = layer_cache.read()
            y = self.attend_canvas(q, k_old, v_old, k, v, mask)  # (B, H, S, d)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1))

    def attend_canvas(self, q, k_cache, v_cache, k_new, v_new, valid) -> torch.Tensor:
        """canvas_attention. The one seam of this file: a fast path (cuda_kernels.KernelAttention)
        overrides this method."""
        return canvas_attention(q, k_cache, v_cache, k_new, v_new, valid)
