"""The KV cache that the causal pass writes and the denoising pass reads.

Block diffusion runs one weight stack in two modes (see model.py):
  - the causal pass (prompt prefill, then each committed canvas) appends its keys and values here;
  - the denoising pass attends bidirectionally over [cache ; canvas] and never writes.

Full-attention layers keep every token. Sliding-window layers show only the last
`sliding_window - 1` tokens, exactly like transformers' DynamicSlidingWindowLayer (cache_utils.py):
a causal pass sees those plus the tokens it appends (its mask applies the window), and the next
denoising pass sees at most `sliding_window - 1` cached tokens. A cache made with `spare=N` keeps N
more tokens than it shows, so that its last N tokens can be taken back (`rollback`) and the layer
still shows exactly what a cache that never held them would: a multi-turn chat re-reads only the
part of the conversation that changed.

Batches are left padded: `valid` marks which of the positions seen so far hold real tokens, so the
attention masks can hide padding (valid[b, p] is False for a pad at absolute position p).

    import torch; from kvcache import KVCache
    cache = KVCache(["sliding_attention", "full_attention"], sliding_window=4, spare=2)
    k = v = torch.zeros(1, 1, 6, 8)                 # (B, Hkv, T, d)
    k_all, v_all = cache.layers[0].append(k, v)     # causal pass: what it may attend to
    cache.length += 6
    k_old, v_old = cache.layers[0].read()           # denoising pass: the last 3 tokens
    cache.rollback(2)                               # forget the last 2 tokens
"""

import torch


class LayerCache:
    """Keys and values of one layer, shaped (B, n_kv_heads, T, head_dim)."""

    def __init__(self, window: int | None, spare: int = 0):
        self.window = window  # None: show everything (full layer); else how many tokens to show
        self.spare = spare  # tokens kept beyond the window, for rollback
        self.k = None
        self.v = None

    def __len__(self) -> int:
        """Tokens shown to the next pass."""
        held = 0 if self.k is None else self.k.shape[2]
        return held if self.window is None else min(held, self.window)

    @property
    def held(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def read(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What a denoising pass attends to besides the canvas."""
        if self.k is None or self.window is None or self.held <= self.window:
            return self.k, self.v
        return self.k[:, :, -self.window:], self.v[:, :, -self.window:]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add new keys/values; return everything this causal pass may attend to."""
        k_old, v_old = self.read()
        k_all = k if k_old is None else torch.cat([k_old, k], dim=2)  # (B, h, shown + S, d)
        v_all = v if v_old is None else torch.cat([v_old, v], dim=2)
        if self.window is None or self.spare == 0 or self.held <= self.window:
            kept_k, kept_v = k_all, v_all
        else:  # the spare tokens beyond the window stay too
            kept_k, kept_v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        if self.window is not None:
            kept_k, kept_v = kept_k[:, :, -(self.window + self.spare):], kept_v[:, :, -(self.window + self.spare):]
        self.k, self.v = kept_k, kept_v
        return k_all, v_all

    def drop_last(self, n: int) -> None:
        if n and self.k is not None:
            self.k, self.v = self.k[:, :, : self.held - n], self.v[:, :, : self.held - n]


class KVCache:
    """One LayerCache per layer plus the bookkeeping shared by all of them."""

    def __init__(self, layer_types: list[str], sliding_window: int, valid: torch.Tensor | None = None,
                 spare: int = 0):
        window = sliding_window - 1
        self.layers = [LayerCache(window if t == "sliding_attention" else None, spare) for t in layer_types]
        self.length = 0  # tokens written so far (the position of the next token)
        self.valid = valid  # (B, length) bool, True for real tokens; None when nothing is padded

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
        """Absolute position of the oldest token this layer shows."""
        return self.length - len(self.layers[layer_idx])

    def positions(self, n: int, device) -> torch.Tensor:
        """(1, n) positions of the next n tokens."""
        return torch.arange(self.length, self.length + n, device=device)[None]

    def canvas_valid(self, layer_idx: int) -> torch.Tensor | None:
        """(B, T_cache) bool: which keys of this layer a denoising pass may see; None when nothing is
        padded (the canvas attends to everything the layer shows)."""
        if not self.has_padding:
            return None
        first = self.first_cached_position(layer_idx)
        return self.valid[:, first: self.length]

    def rollback(self, n: int) -> None:
        """Forget the last n tokens, as if they had never been appended. Sliding layers can do so
        only while they keep n spare tokens beyond their window (the `spare` of the constructor)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot roll back {n} of {self.length} tokens")
        for layer in self.layers:
            if layer.window is not None and layer.held - n < min(layer.window, self.length - n):
                raise ValueError(f"cannot roll back {n} tokens: a sliding layer keeps only {layer.spare} spare")
            layer.drop_last(n)
        self.length -= n
        if self.valid is not None:
            self.valid = self.valid[:, : self.length]
