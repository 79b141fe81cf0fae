"""The KV cache: sliding layers keep window - 1 tokens as transformers does, and a cache with spare
tokens rolls back to exactly what a cache that never saw the dropped tokens holds."""

import pytest
import torch

from kvcache import KVCache


def fill(cache: KVCache, values: list[float]):
    """A causal pass writing one value per token into every layer."""
    k = torch.tensor(values).view(1, 1, -1, 1)
    for layer in cache.layers:
        layer.append(k, k)
    cache.length += len(values)


def shown(cache: KVCache) -> list[list[float]]:
    return [[] if layer.read()[0] is None else layer.read()[0].flatten().tolist() for layer in cache.layers]


def test_sliding_cache_keeps_window_minus_one():
    cache = KVCache(["sliding_attention", "full_attention"], sliding_window=4)
    k = torch.arange(6.0).view(1, 1, 6, 1)
    full_k, _ = cache.layers[0].append(k, k)
    assert full_k.shape[2] == 6  # this pass sees everything it was given
    assert cache.layers[0].k.flatten().tolist() == [3.0, 4.0, 5.0]  # keeps the last window - 1
    cache.layers[1].append(k, k)
    assert len(cache.layers[1]) == 6
    cache.length = 6
    assert cache.first_cached_position(0) == 3 and cache.first_cached_position(1) == 0


def test_causal_pass_sees_window_not_spare():
    cache = KVCache(["sliding_attention"], sliding_window=3, spare=4)
    fill(cache, [0, 1, 2, 3, 4])
    k_all, _ = cache.layers[0].append(torch.tensor([5.0]).view(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))
    assert k_all.flatten().tolist() == [3.0, 4.0, 5.0]  # what transformers' layer would return
    assert cache.layers[0].held == 6  # but the spare tokens are kept


@pytest.mark.parametrize("n", [1, 3, 5])
def test_rollback_equals_never_having_seen(n):
    types = ["sliding_attention", "full_attention"]
    rolled = KVCache(types, sliding_window=4, spare=5)
    fill(rolled, [0, 1, 2, 3, 4, 5])
    fill(rolled, [6, 7, 8, 9, 10][:5])
    rolled.rollback(n)
    fresh = KVCache(types, sliding_window=4)
    fill(fresh, list(range(11 - n)))
    assert rolled.length == fresh.length == 11 - n
    assert shown(rolled) == shown(fresh)
    fill(rolled, [42.0])
    fill(fresh, [42.0])
    assert shown(rolled) == shown(fresh)


def test_rollback_beyond_the_spare_is_refused():
    cache = KVCache(["sliding_attention", "full_attention"], sliding_window=3, spare=1)
    fill(cache, list(range(8)))
    with pytest.raises(ValueError, match="spare"):
        cache.rollback(3)
    cache.rollback(1)  # within the spare
    assert cache.length == 7 and shown(cache)[0] == [5.0, 6.0]


def test_canvas_valid_follows_the_cache():
    cache = KVCache(["sliding_attention", "full_attention"], sliding_window=3)
    assert cache.canvas_valid(0) is None
    cache.extend_valid(torch.tensor([[False, True, True, True, True]]), 1, 5, "cpu")
    k = torch.zeros(1, 1, 5, 2)
    for layer in cache.layers:
        layer.append(k, k)
    cache.length = 5
    assert cache.canvas_valid(0).tolist() == [[True, True]]  # the sliding layer shows its last 2
    assert cache.canvas_valid(1).tolist() == [[False, True, True, True, True]]
