"""The sampler and the loop: the temperature schedule, the entropy bound and the stop rule by hand,
pinned positions, EOS handling, NaN logits, the random streams (per row: the same draws as the
shared stream for one row; a row's text independent of its batch), and the seam for a fused pass."""

import math

import pytest
import torch

from conftest import test_config
from kvcache import KVCache
from model import DiffusionGemma, init_weights
from sampler import (DenoiseState, GenerationSettings, NonFiniteLogits, SamplerSettings, block_diffusion,
                     denoise_canvas, entropy, entropy_bound_accept, finalize_canvas, logit_stats, sampler_step,
                     temperature, trim)
from streams import RandomStreams


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


def start(B, C, V, steps, pins=None, seeds=None):
    return DenoiseState.start(B, C, V, RandomStreams(seeds, "cpu"), steps, pins=pins)


def test_sampler_step_renoises_and_stops():
    torch.manual_seed(0)
    B, C, V = 2, 6, 50
    s = SamplerSettings(max_steps=4, confidence_threshold=0.005)
    raw = torch.zeros(B, C, V)
    raw[0, :, 7] = 60.0  # row 0 certain of token 7 everywhere; row 1 uniform
    st = sampler_step(start(B, C, V, 4), raw, s, torch.float32)
    assert st.accepted[0].all() and st.canvas[0].eq(7).all() and st.argmax[0].eq(7).all()
    assert st.accepted[1].sum() == 1  # uniform row: one token within the bound
    assert not st.finished.any() and st.step == 3  # first step: history is -1, never stable
    st2 = sampler_step(st, raw, s, torch.float32)
    assert st2.finished.tolist() == [True, False]  # stable and confident
    raw2 = raw.clone()
    raw2[0, :, 7], raw2[0, :, 9] = 0.0, 60.0
    st3 = sampler_step(st2, raw2, s, torch.float32)  # a finished row keeps its canvas and argmax
    assert st3.argmax[0].eq(7).all() and st3.canvas[0].eq(7).all()


def test_pinned_positions_never_renoised():
    torch.manual_seed(1)
    pinned = torch.zeros(1, 8, dtype=torch.bool)
    pinned[0, [2, 7]] = True
    tokens = torch.zeros(1, 8, dtype=torch.long)
    tokens[0, 2], tokens[0, 7] = 11, 12
    state = start(1, 8, 40, 5, (pinned, tokens))
    while state.step > 0:  # the model disagrees with the pins
        state = sampler_step(state, torch.randn(1, 8, 40) * 3, SamplerSettings(max_steps=5), torch.float32)
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
    return init_weights(DiffusionGemma(test_config("test-b")), std=0.3, seed=seed)


def test_nan_logits_stop_with_the_canvas_and_step():
    model = small_model()
    s = GenerationSettings(max_new_tokens=16, eos_token_ids=(), sampler=SamplerSettings(max_steps=4))
    seen = []

    def break_after_first_canvas(ci, new, finished):
        seen.append(ci)
        with torch.no_grad():
            model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLogits, match="canvas 2, step 4"):  # the second canvas, its first step
        block_diffusion(model, [[2, 3, 4]], s, on_canvas=break_after_first_canvas)
    assert seen == [0]


def test_one_row_streams_are_the_shared_stream():
    """A per-row stream seeded s draws what torch's default generator draws after manual_seed(s), in
    the same order: one row reproduces transformers either way."""
    model = small_model(4)
    s = GenerationSettings(max_new_tokens=24, eos_token_ids=(), sampler=SamplerSettings(max_steps=4))
    torch.manual_seed(7)
    shared = block_diffusion(model, [[2, 9, 4]], s)
    torch.manual_seed(123)  # the default generator's state does not matter to a per-row stream
    own = block_diffusion(model, [[2, 9, 4]], s, seeds=[7])
    assert torch.equal(shared.sequences, own.sequences) and shared.steps == own.steps


def test_a_rows_text_does_not_depend_on_its_batch():
    """Per-row streams: a prompt alone, and in batches of other prompts of other lengths (left
    padded), some of which stop at EOS early, gets the same tokens."""
    model = small_model(5)
    s = GenerationSettings(max_new_tokens=20, eos_token_ids=(1,), sampler=SamplerSettings(max_steps=5, entropy_bound=2.0))
    prompt = [2, 17, 42, 7, 9]
    alone = block_diffusion(model, [prompt], s, seeds=[3]).tokens[0]
    others = [[2, 11], [2, 5, 6, 7, 8, 9, 10, 11, 12], [2, 30, 31]]
    for batch in ([prompt] + others[:1], others[:2] + [prompt], others + [prompt]):
        seeds = [3 if p is prompt else 100 + i for i, p in enumerate(batch)]
        result = block_diffusion(model, batch, s, seeds=seeds)
        assert result.tokens[batch.index(prompt)] == alone
    shared = block_diffusion(model, others + [prompt], s)  # the shared stream: the batch changes the draws
    assert shared.tokens[-1] != alone


def test_per_row_streams_skip_the_rows_that_do_not_draw():
    rng = RandomStreams([1, 2], "cpu")
    both = rng.randint(1000, 2, 5, torch.tensor([True, True]))
    rng = RandomStreams([1, 2], "cpu")
    first = rng.randint(1000, 2, 5, torch.tensor([False, True]))  # row 0 draws nothing...
    again = rng.randint(1000, 2, 5, torch.tensor([True, True]))
    assert torch.equal(first[1], both[1]) and first[0].eq(0).all()
    assert torch.equal(again[0], both[0])  # ... so its next draw is the one it would have made


def gumbel_stats(raw, T, state):
    """A stand-in for a fused pass with logit_stats' signature (Gumbel-max sampling)."""
    x = raw / T
    u = torch.rand_like(x).clamp(1e-7, 1 - 1e-7)
    noise = torch.randint(0, x.shape[-1], x.shape[:2])
    return (x - torch.log(-torch.log(u))).argmax(-1), x.argmax(-1), entropy(x), x.to(torch.bfloat16), noise


def test_a_fused_sampler_pass_plugs_in():
    """denoise_canvas with another stats function (the fused pass's seam): pins hold, the
    self-conditioning logits come from it, and the loop stops as it should."""
    model = small_model(2)
    pinned = torch.zeros(1, 8, dtype=torch.bool)
    pinned[0, 3] = True
    tokens = torch.full((1, 8), 9)
    cache = KVCache(model.config.layer_types, model.config.sliding_window)
    model.forward_causal(torch.tensor([[2, 5, 6]]), cache)
    torch.manual_seed(0)
    state = start(1, 8, model.config.vocab_size, 6, (pinned, tokens))
    calls = []
    final, steps = denoise_canvas(model, cache, state, SamplerSettings(max_steps=6),
                                  stats=lambda *a: calls.append(1) or gumbel_stats(*a))
    assert final.argmax[0, 3] == 9 and final.canvas[0, 3] == 9 and 1 <= steps <= 6 and len(calls) == steps
    assert final.sc_logits.dtype == model.dtype and final.sc_logits.shape == (1, 8, model.config.vocab_size)
    out = logit_stats(torch.randn(1, 8, 50), torch.tensor(0.5), start(1, 8, 50, 1))  # the plain pass: the same parts
    assert [t.shape for t in out] == [(1, 8), (1, 8), (1, 8), (1, 8, 50), (1, 8)]
