"""The sampler and the loop: the temperature schedule, the entropy bound and the stop rule by hand,
pinned positions, EOS handling, NaN logits, and the CUDA-graph denoiser's state handling (with an
eager stand-in for the capture) against the plain loop, step by step."""

import math

import pytest
import torch

from cudagraph import GraphedDenoiser
from kvcache import KVCache
from model import DiffusionGemma, DiffusionGemmaConfig, init_weights
from sampler import (DenoiseState, GenerationSettings, NonFiniteLogits, SamplerSettings, block_diffusion,
                     denoise_canvas, entropy, entropy_bound_accept, finalize_canvas, sampler_step, temperature, trim)


def test_temperature_schedule():
    s = SamplerSettings(max_steps=48, t_min=0.4, t_max=0.8)
    assert temperature(48, s).item() == pytest.approx(0.8, abs=1e-7)
    assert temperature(24, s).item() == pytest.approx(0.6, abs=1e-7)
    assert temperature(1, s).item() == pytest.approx(0.4 + 0.4 / 48, abs=1e-7)  # 0.408333
    assert temperature(1, s).dtype == torch.float32
    assert temperature(8, SamplerSettings(max_steps=16)).item() == pytest.approx(0.6, abs=1e-7)


def test_entropy_bound_acceptance_by_hand():
    # sorted: 0.01 (pos 2), 0.05 (pos 0), 0.2 (pos 3), 0.5 (pos 1); cumsum - self: 0, .01, .06, .26
    h = torch.tensor([[0.05, 0.5, 0.01, 0.2]])
    assert entropy_bound_accept(h, 0.1).tolist() == [[True, False, True, True]]
    # a tight bound still accepts the single most certain token
    assert entropy_bound_accept(torch.tensor([[3.0, 2.0, 4.0]]), 0.1).tolist() == [[False, True, False]]
    assert entropy_bound_accept(torch.full((1, 4), 0.3), 1.0).all()
    assert entropy_bound_accept(torch.full((1, 4), 0.3), 0.5).sum() == 2


def test_entropy_matches_categorical_and_by_hand():
    logits = torch.randn(2, 5, 11)
    assert torch.equal(entropy(logits), torch.distributions.Categorical(logits=logits).entropy())
    assert entropy(torch.zeros(1, 1, 4)).item() == pytest.approx(math.log(4))
    assert entropy(torch.tensor([[[0.0, -1e30]]])).item() == pytest.approx(0.0)


def test_sampler_step_renoises_and_stops():
    torch.manual_seed(0)
    B, C, V = 2, 6, 50
    s = SamplerSettings(max_steps=4, confidence_threshold=0.005)
    raw = torch.zeros(B, C, V)
    raw[0, :, 7] = 60.0  # row 0 certain of token 7 everywhere; row 1 uniform
    st = sampler_step(DenoiseState.start(B, C, V, "cpu"), raw, 4, s, torch.float32)
    assert st.accepted[0].all() and st.canvas[0].eq(7).all() and st.argmax[0].eq(7).all()
    assert st.accepted[1].sum() == 1  # uniform row: one token within the bound
    assert not st.finished.any()  # first step: history is -1, never stable
    st2 = sampler_step(st, raw, 3, s, torch.float32)
    assert st2.finished.tolist() == [True, False]  # stable and confident
    raw2 = raw.clone()
    raw2[0, :, 7], raw2[0, :, 9] = 0.0, 60.0
    st3 = sampler_step(st2, raw2, 2, s, torch.float32)  # a finished row keeps its canvas and argmax
    assert st3.argmax[0].eq(7).all() and st3.canvas[0].eq(7).all()


def test_pinned_positions_never_renoised():
    torch.manual_seed(1)
    pinned = torch.zeros(1, 8, dtype=torch.bool)
    pinned[0, [2, 7]] = True
    tokens = torch.zeros(1, 8, dtype=torch.long)
    tokens[0, 2], tokens[0, 7] = 11, 12
    state = DenoiseState.start(1, 8, 40, "cpu", pinned, tokens)
    for step in range(5, 0, -1):
        state = sampler_step(state, torch.randn(1, 8, 40) * 3, step, SamplerSettings(max_steps=5), torch.float32,
                             pinned, tokens)  # the model disagrees with the pins
        assert state.accepted[0, 2] and state.accepted[0, 7]
        assert state.canvas[0, [2, 7]].tolist() == [11, 12] and state.argmax[0, [2, 7]].tolist() == [11, 12]


def test_finalize_pads_after_the_first_eos_and_finished_rows():
    seq = torch.tensor([[9, 5, 1, 6, 1], [9, 5, 6, 7, 8]])  # prompt 1 token, canvas of 4
    finished = finalize_canvas(seq, torch.tensor([False, False]), 4, torch.tensor([1]), 0, max_length=100)
    assert finished.tolist() == [True, False]
    assert seq.tolist() == [[9, 5, 1, 0, 0], [9, 5, 6, 7, 8]]  # EOS kept, what follows padded
    seq2 = torch.cat([seq, torch.tensor([[3, 3, 3, 3], [1, 2, 2, 2]])], 1)
    finished = finalize_canvas(seq2, finished, 4, torch.tensor([1]), 0, max_length=100)
    assert seq2[0, -4:].tolist() == [0, 0, 0, 0] and seq2[1, -4:].tolist() == [1, 0, 0, 0]
    assert trim([5, 1, 0], GenerationSettings(max_new_tokens=9, eos_token_ids=(1,))) == [5]
    assert trim([5, 6, 7], GenerationSettings(max_new_tokens=2)) == [5, 6]


def test_settings_copy_overrides_without_sharing():
    base = GenerationSettings()
    new = base.copy(steps=3, entropy_bound=2.0, max_new_tokens=7, eos_token_ids=())
    assert (new.sampler.max_steps, new.sampler.entropy_bound, new.max_new_tokens, new.eos_token_ids) == (3, 2.0, 7, ())
    assert base.sampler.max_steps == 48 and base.eos_token_ids == (1, 106, 50)
    assert base.canvases(256) == 1 and new.canvases(4) == 2


def small_model(seed=0):
    return init_weights(DiffusionGemma(DiffusionGemmaConfig.from_name("test-b")), std=0.3, seed=seed)


def test_nan_logits_stop_with_the_canvas_and_step():
    model = small_model()
    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLogits, match="canvas 1, step 4"):
        block_diffusion(model, [[2, 3, 4]], GenerationSettings(max_new_tokens=8, sampler=SamplerSettings(max_steps=4)))


def eager_capture(body, pool):
    """A stand-in for the CUDA capture: it runs body() once (the warm-up) and again at each replay."""
    body()
    return type("Eager", (), {"replay": staticmethod(body)})()


@pytest.mark.parametrize("confidence", [None, 0.005])
def test_graphed_denoiser_equals_the_plain_loop(confidence):
    """One graph for a whole generation (here an eager stand-in for the capture): a padded batch,
    three canvases, pins; the same tokens, steps and states as the same fixed cache run without a
    graph, with one capture. (Against the plain loop's growing cache only the logits agree, to
    float rounding: test_static_cache_equals_the_growing_one; this random model amplifies that.)"""
    model = small_model(1)
    s = GenerationSettings(max_new_tokens=20, sampler=SamplerSettings(max_steps=5, confidence_threshold=confidence,
                                                                      entropy_bound=5.0))
    prompts = [[2, 17, 42, 7, 9], [2, 11]]
    pins = [{1: 13, 17: 5}, {}]
    results = {}
    graphed = GraphedDenoiser(capture=eager_capture)
    for name, denoise in (("plain", GraphedDenoiser(use_graph=False)), ("graph", graphed)):
        torch.manual_seed(0)
        seen = []
        results[name] = block_diffusion(model, prompts, s, pins=pins, denoise=denoise,
                                        on_step=lambda ci, step, st: seen.append((ci, step, st.argmax.clone())))
        results[name].seen = seen
    plain, graph = results["plain"], results["graph"]
    assert torch.equal(plain.sequences, graph.sequences) and plain.steps == graph.steps
    assert len(plain.seen) == len(graph.seen) and all(
        a[:2] == b[:2] and torch.equal(a[2], b[2]) for a, b in zip(plain.seen, graph.seen))
    assert graph.canvases == 3 and graphed.captures == 1  # one capture served every canvas
    assert graph.sequences[0, 5 + 1] == 13 and graph.sequences[0, 5 + 17] == 5


def test_static_cache_equals_the_growing_one():
    """Causal passes into a StaticKVCache then a canvas pass over its fixed buffers (masked by the
    device length) give the growing cache's logits."""
    model = small_model(3)
    caches = [KVCache(model.config.layer_types, model.config.sliding_window),
              GraphedDenoiser().new_cache(model, 1, 64)]
    logits = []
    for cache in caches:
        model.forward_causal(torch.arange(3, 33)[None], cache)  # longer than the sliding window
        model.forward_causal(torch.arange(40, 48)[None], cache)
        logits.append(model.forward_canvas(torch.arange(50, 58)[None], cache))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)
    assert int(caches[1].length_t) == caches[1].length == 38


def gumbel_stats(raw, T):
    """A plain-torch stand-in for cuda_kernels.sampler_stats (the same outputs, Gumbel-max sampling)."""
    x = raw / T
    u = torch.rand_like(x).clamp(1e-7, 1 - 1e-7)
    return (x - torch.log(-torch.log(u))).argmax(-1), x.argmax(-1), entropy(x), x.to(torch.bfloat16)


def test_a_fused_sampler_pass_plugs_in():
    """sampler_step with `stats` (the fused pass's seam): pins hold, the self-conditioning logits are
    what the pass returned, and the loop stops as it should."""
    model = small_model(2)
    pinned = torch.zeros(1, 8, dtype=torch.bool)
    pinned[0, 3] = True
    tokens = torch.full((1, 8), 9)
    cache = KVCache(model.config.layer_types, model.config.sliding_window)
    model.forward_causal(torch.tensor([[2, 5, 6]]), cache)
    torch.manual_seed(0)
    state = DenoiseState.start(1, 8, model.config.vocab_size, "cpu", pinned, tokens)
    final, steps = denoise_canvas(model, cache, state, SamplerSettings(max_steps=6), pinned, tokens, stats=gumbel_stats)
    assert final.argmax[0, 3] == 9 and final.canvas[0, 3] == 9 and 1 <= steps <= 6
    assert final.sc_logits.dtype == model.dtype and final.sc_logits.shape == (1, 8, model.config.vocab_size)
