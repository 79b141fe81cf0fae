"""The KV cache that the causal pass writes and the denoising pass reads.

Block diffusion runs one weight stack in two modes (see model.py):
  - the causal pass (prompt prefill, then each committed canvas) appends its keys and values here;
  - the denoising pass attends bidirectionally over [cache ; canvas] and never writes.

Full-attention layers keep every token. Sliding-window layers keep only the last
`sliding_window - 1` tokens after each append, exactly like transformers' DynamicSlidingWindowLayer:
the causal pass still sees the whole concatenation it was given, and the next query can see at most
`sliding_window - 1` older tokens plus itself.

Batches are left padded: `valid` marks which of the positions seen so far hold real tokens, so the
attention masks can hide padding (kvcache.valid[b, p] is False for a pad at absolute position p).

    cache = KVCache(config, batch_size=1)
    k_all, v_all = cache.layers[i].append(k, v)   # causal pass
    k_old, v_old = cache.layers[i].read()         # denoising pass
"""

import torch


class LayerCache:
    """Keys and values of one layer, shaped (B, n_kv_heads, T, head_dim)."""

    def __init__(self, keep: int | None):
        self.keep = keep  # None: keep everything (full layer); else the sliding layer's bound
        self.k = None
        self.v = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add new keys/values; return everything this causal pass may attend to."""
        if self.k is not None:
            k = torch.cat([self.k, k], dim=2)  # (B, h, T_old + T_new, d)
            v = torch.cat([self.v, v], dim=2)
        if self.keep is None:
            self.k, self.v = k, v
        else:
            self.k, self.v = k[:, :, -self.keep:], v[:, :, -self.keep:]
        return k, v

    def read(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.k, self.v


class KVCache:
    """One LayerCache per layer plus the bookkeeping shared by all of them."""

    def __init__(self, layer_types: list[str], sliding_window: int, valid: torch.Tensor | None = None):
        keep = sliding_window - 1
        self.layers = [LayerCache(keep if t == "sliding_attention" else None) for t in layer_types]
        self.length = 0  # tokens written so far (the position of the next token)
        # (B, length) bool, True for real tokens; None when nothing is padded
        self.valid = valid

    def extend_valid(self, new_valid: torch.Tensor | None, batch_size: int, n_new: int, device) -> None:
        """Record which of the next n_new positions are real tokens (call before the causal pass)."""
        if self.valid is None and new_valid is None:
            return
        if new_valid is None:
            new_valid = torch.ones(batch_size, n_new, dtype=torch.bool, device=device)
        if self.valid is None:
            self.valid = torch.ones(batch_size, self.length, dtype=torch.bool, device=device)
        self.valid = torch.cat([self.valid, new_valid.to(device=device, dtype=torch.bool)], dim=1)

    @property
    def has_padding(self) -> bool:
        return self.valid is not None and not bool(self.valid.all())

    def first_cached_position(self, layer_idx: int) -> int:
        """Absolute position of the oldest token still held by this layer."""
        return self.length - len(self.layers[layer_idx])

    def memory_bytes(self) -> int:
        return sum(l.k.numel() * l.k.element_size() * 2 for l in self.layers if l.k is not None)
