"""The CUDA-graph denoiser's state handling, on the CPU: an eager stand-in replays the captured step,
a sync-free MoE and a keyed sampler pass stand in for the kernels. The graphs give the tokens of the
same fixed cache run eagerly, are captured once per generation, refuse a MoE that waits for the
host; the fixed cache (sliding layers as rings) gives the growing cache's logits."""

import pytest
import torch

from conftest import test_config
from cuda_kernels.graph import GraphedDenoiser, StaticKVCache
from kvcache import KVCache
from model import DiffusionGemma, init_weights
from moe import Experts, expert_mlp
from sampler import GenerationSettings, SamplerSettings, block_diffusion, entropy
from structured import Allowed


class DenseExperts(Experts):
    """Every expert on every token, weighted by the routing (zero for the experts not picked): what
    the plain MoE computes, with no host sync (a stand-in for cuda_kernels.FusedExperts)."""

    def forward(self, x, idx, weights):
        dense = torch.zeros(x.shape[0], self.num_experts, dtype=torch.float32)
        dense.scatter_(1, idx, weights)  # (T, E)
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
        for e in range(self.num_experts):
            out += expert_mlp(x, *self.expert_weights(e, x.dtype)).float() * dense[:, e:e + 1]
        return out.to(x.dtype)


def keyed_stats(raw, T, keys):
    """A keyed sampler pass (the signature of cuda_kernels.sampler_stats): row b's draws come from
    keys[b] alone."""
    B, C, V = raw.shape
    x = raw / T
    gens = [torch.Generator().manual_seed(int(k)) for k in keys]
    u = torch.stack([torch.rand(C, V, generator=g) for g in gens]).clamp(1e-7, 1 - 1e-7)
    noise = torch.stack([torch.randint(0, V, (C,), generator=g) for g in gens])
    return (x - torch.log(-torch.log(u))).argmax(-1), x.argmax(-1), entropy(x), x.to(torch.bfloat16), noise


def model_without_host_sync(seed: int):
    model = init_weights(DiffusionGemma(test_config("test-b")), std=0.3, seed=seed)
    for layer in model.layers:
        layer.experts.__class__ = DenseExperts
    return model


def eager_capture(calls):
    """A stand-in for the CUDA capture: body() runs once (the warm-up) and again at each replay."""
    def capture(body, pool):
        calls.append(1)
        body()
        return type("Eager", (), {"replay": staticmethod(body)})()
    return capture


@pytest.mark.parametrize("confidence", [None, 0.005])
@pytest.mark.parametrize("seeds", [None, [5, 6]])
def test_graphs_equal_the_same_steps_run_eagerly(confidence, seeds):
    """A padded batch, three canvases, pins: the same tokens, steps and per-step argmaxes with the
    graphs as without them, and two captures for the whole generation."""
    model = model_without_host_sync(1)
    s = GenerationSettings(max_new_tokens=20, sampler=SamplerSettings(max_steps=5, confidence_threshold=confidence,
                                                                      entropy_bound=5.0))
    prompts, pins = [[2, 17, 42, 7, 9], [2, 11]], [{1: 13, 17: 5}, {}]
    calls, results = [], {}
    for name, denoise in (("eager", GraphedDenoiser(keyed_stats, use_graph=False)),
                          ("graph", GraphedDenoiser(keyed_stats, capture=eager_capture(calls)))):
        torch.manual_seed(0)
        seen = []
        results[name] = (block_diffusion(model, prompts, s, pins=pins, seeds=seeds, denoise=denoise,
                                         new_cache=denoise.new_cache,
                                         on_step=lambda ci, step, st: seen.append((ci, step, st.argmax.clone()))), seen)
    (eager, seen_e), (graph, seen_g) = results["eager"], results["graph"]
    assert torch.equal(eager.sequences, graph.sequences) and eager.steps == graph.steps
    assert len(seen_e) == len(seen_g) and all(a[:2] == b[:2] and torch.equal(a[2], b[2]) for a, b in zip(seen_e, seen_g))
    assert graph.canvases == 3 and len(calls) == 2  # the first step and the later steps, for all canvases
    assert graph.sequences[0, 5 + 1] == 13 and graph.sequences[0, 5 + 17] == 5


def test_restricted_canvases_run_the_keyed_steps_eagerly():
    """A canvas with positions restricted to token sets (structured.Allowed) on the fast path: the
    keyed sampler pass sees the restricted logits (every restricted token is in its set), that canvas
    runs eagerly, the others in the graphs, and the tokens are those of the fast path run eagerly."""
    model = model_without_host_sync(2)
    s = GenerationSettings(max_new_tokens=24, sampler=SamplerSettings(max_steps=4, entropy_bound=5.0))
    sets = [[20, 21, 22], [100, 101]]
    allowed = Allowed(sets, [{9: 0, 10: 0, 15: 1}, {8: 1}])  # canvas 2 of 3 (C = 8)
    calls, out = [], {}
    for name, denoise in (("eager", GraphedDenoiser(keyed_stats, use_graph=False)),
                          ("graph", GraphedDenoiser(keyed_stats, capture=eager_capture(calls)))):
        out[name] = block_diffusion(model, [[2, 17, 42], [2, 11, 5]], s, seeds=[1, 2], allowed=allowed, denoise=denoise,
                                    new_cache=denoise.new_cache)
    assert torch.equal(out["eager"].sequences, out["graph"].sequences) and len(calls) == 2
    new = out["graph"].sequences[:, 3:]
    assert new[0, 9] in sets[0] and new[0, 10] in sets[0] and new[0, 15] in sets[1] and new[1, 8] in sets[1]


def test_graphs_refuse_a_moe_that_waits_for_the_host():
    model = init_weights(DiffusionGemma(test_config("test-b")), seed=0)  # the plain MoE: bincount().tolist()
    graphed = GraphedDenoiser(keyed_stats, capture=eager_capture([]))
    with pytest.raises(ValueError, match="layer 0 runs the plain one"):
        block_diffusion(model, [[2, 3]], GenerationSettings(max_new_tokens=8), denoise=graphed,
                        new_cache=graphed.new_cache)


@pytest.mark.parametrize("prompt", [5, 30])  # shorter and longer than the sliding window (23 shown)
def test_static_cache_equals_the_growing_one(prompt):
    """Causal passes into the fixed buffers (sliding layers as rings), then canvas passes over them
    (masked by the device length): the growing cache's logits, canvas after canvas."""
    model = init_weights(DiffusionGemma(test_config("test-b")), std=0.3, seed=3)
    caches = [KVCache(model.config.layer_types, model.config.sliding_window),
              GraphedDenoiser(keyed_stats).new_cache(model, 2, 64)]
    valid = torch.ones(2, prompt, dtype=torch.bool)
    valid[1, :2] = False  # the second row is left padded
    logits = [[], []]
    for j, cache in enumerate(caches):
        model.forward_causal(torch.arange(3, 3 + prompt).repeat(2, 1), cache, valid)
        for canvas in range(3):
            logits[j].append(model.forward_canvas(torch.arange(50, 58).repeat(2, 1) + canvas, cache))
            model.forward_causal(torch.arange(40, 48).repeat(2, 1) + canvas, cache)
    for a, b in zip(*logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    static = caches[1]
    assert int(static.length_t) == static.length == prompt + 24
    assert static.layers[0].k_buf.shape[2] == model.config.sliding_window - 1  # a ring of what the layer shows
    assert static.layers[1].k_buf.shape[2] == 64


def test_static_cache_takes_a_prompt_with_an_image():
    """An image block (30 tokens, wider than the sliding window of 24) in a left-padded prompt: the
    fixed buffers give the growing cache's logits."""
    model = init_weights(DiffusionGemma(test_config("test-b", image_token_id=7)), std=0.3, seed=4)
    ids = torch.arange(10, 50).repeat(2, 1)
    ids[:, 6:36] = 7
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, :3] = False
    image_embeds = torch.randn(60, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    out = []
    for cache in (KVCache(model.config.layer_types, model.config.sliding_window),
                  GraphedDenoiser(keyed_stats).new_cache(model, 2, 64)):
        model.forward_causal(ids, cache, valid, image_embeds)
        out.append(model.forward_canvas(torch.arange(50, 58).repeat(2, 1), cache))
    torch.testing.assert_close(out[0], out[1], atol=1e-4, rtol=0)  # logits up to 30: fp32 sums in two orders


def test_a_full_unpadded_ring_needs_no_mask():
    model = init_weights(DiffusionGemma(test_config("test-b")), seed=0)
    cache = GraphedDenoiser(keyed_stats).new_cache(model, 1, 64)
    assert isinstance(cache, StaticKVCache)
    model.forward_causal(torch.arange(3, 13)[None], cache)
    assert cache.canvas_valid(0) is not None  # 10 of 23 slots written
    model.forward_causal(torch.arange(3, 30)[None], cache)
    assert cache.canvas_valid(0) is None and cache.canvas_valid(1).shape == (1, 64)
