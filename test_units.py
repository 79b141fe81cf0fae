"""Pure helpers against hand-written expected values: RoPE tables, the temperature schedule, the
entropy-bound acceptance, the stop rule, masks, the MoE grouping and the config reader."""

import math

import pytest
import torch

from attention import causal_mask, rope_cos_sin, rope_inv_freq
from kvcache import KVCache
from model import CheckpointError, DiffusionGemmaConfig
from moe import Experts, expert_mlp
from sampler import DenoiseState, SamplerSettings, entropy, entropy_bound_accept, sampler_step, temperature


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
    expect_cos = [math.cos(5), math.cos(5 * 1e6 ** -0.25), 1.0, 1.0]
    torch.testing.assert_close(cos[0, 0], torch.tensor(expect_cos * 2))
    torch.testing.assert_close(sin[0, 0, 2:4], torch.zeros(2))
    # released shape: head_dim 512, factor 0.25 -> 64 rotating pairs; dims 0-63 and 256-319 rotate
    inv = rope_inv_freq(512, 1e6, "proportional", 0.25)
    assert inv.shape == (256,) and (inv[:64] > 0).all() and (inv[64:] == 0).all()
    torch.testing.assert_close(inv[1], torch.tensor(1e6 ** (-2 / 512)))


def test_temperature_schedule():
    s = SamplerSettings(max_steps=48, t_min=0.4, t_max=0.8)
    assert temperature(48, s).item() == pytest.approx(0.8, abs=1e-7)
    assert temperature(24, s).item() == pytest.approx(0.6, abs=1e-7)
    assert temperature(1, s).item() == pytest.approx(0.4 + 0.4 / 48, abs=1e-7)  # 0.408333
    assert temperature(1, s).dtype == torch.float32
    s16 = SamplerSettings(max_steps=16)
    assert temperature(8, s16).item() == pytest.approx(0.6, abs=1e-7)


def test_entropy_bound_acceptance_by_hand():
    # sorted: 0.01 (pos 2), 0.05 (pos 0), 0.2 (pos 3), 0.5 (pos 1)
    # cumsum - self: 0, 0.01, 0.06, 0.26 -> the first three are within 0.1
    h = torch.tensor([[0.05, 0.5, 0.01, 0.2]])
    assert entropy_bound_accept(h, 0.1).tolist() == [[True, False, True, True]]
    # a tight bound still accepts the single most certain token
    assert entropy_bound_accept(torch.tensor([[3.0, 2.0, 4.0]]), 0.1).tolist() == [[False, True, False]]
    # bound 1.0 over [0.3, 0.3, 0.3, 0.3]: cumsum - self = 0, .3, .6, .9 -> all
    assert entropy_bound_accept(torch.full((1, 4), 0.3), 1.0).all()
    assert entropy_bound_accept(torch.full((1, 4), 0.3), 0.5).sum() == 2


def test_entropy_matches_categorical_and_by_hand():
    logits = torch.randn(2, 5, 11)
    ref = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.equal(entropy(logits), ref)
    assert entropy(torch.zeros(1, 1, 4)).item() == pytest.approx(math.log(4))
    assert entropy(torch.tensor([[[0.0, -1e30]]])).item() == pytest.approx(0.0)


def test_sampler_step_renoises_and_stops():
    torch.manual_seed(0)
    B, C, V = 2, 6, 50
    s = SamplerSettings(max_steps=4, confidence_threshold=0.005)
    state = DenoiseState.start(B, C, V, "cpu")
    # row 0 certain of token 7 everywhere; row 1 uniform
    raw = torch.zeros(B, C, V)
    raw[0, :, 7] = 60.0
    st = sampler_step(state, raw, 4, s, torch.float32)
    assert st.accepted[0].all() and st.canvas[0].eq(7).all() and st.argmax[0].eq(7).all()
    assert st.accepted[1].sum() == 1  # uniform row: one token within the bound
    assert not st.finished.any()  # first step: history is -1, never stable
    st2 = sampler_step(st, raw, 3, s, torch.float32)
    assert st2.finished.tolist() == [True, False]  # stable and confident
    # a finished row keeps its canvas and argmax even if the logits change
    raw2 = raw.clone()
    raw2[0, :, 7], raw2[0, :, 9] = 0.0, 60.0
    st3 = sampler_step(st2, raw2, 2, s, torch.float32)
    assert st3.argmax[0].eq(7).all() and st3.canvas[0].eq(7).all()


def test_pinned_positions_never_renoised():
    torch.manual_seed(1)
    B, C, V = 1, 8, 40
    pinned = torch.zeros(B, C, dtype=torch.bool)
    pinned[0, [2, 7]] = True
    tokens = torch.zeros(B, C, dtype=torch.long)
    tokens[0, 2], tokens[0, 7] = 11, 12
    state = DenoiseState.start(B, C, V, "cpu", pinned, tokens)
    assert state.canvas[0, 2] == 11 and state.canvas[0, 7] == 12
    for step in range(5, 0, -1):
        raw = torch.randn(B, C, V) * 3  # the model disagrees with the pins
        state = sampler_step(state, raw, step, SamplerSettings(max_steps=5), torch.float32, pinned, tokens)
        assert state.accepted[0, 2] and state.accepted[0, 7]
        assert state.canvas[0, 2] == 11 and state.canvas[0, 7] == 12
        assert state.argmax[0, 2] == 11 and state.argmax[0, 7] == 12


def test_causal_mask_sliding_and_padding():
    cache = KVCache(["sliding_attention", "full_attention"], sliding_window=3)
    cache.extend_valid(torch.tensor([[False, True, True, True]]), 1, 4, "cpu")
    m_sliding = causal_mask(cache, 0, 4, 3, "cpu")[0, 0].int().tolist()
    # keys 0..3 (key 0 is padding), window 3: q sees k in (q-3, q]
    assert m_sliding == [[0, 0, 0, 0],
                         [0, 1, 0, 0],
                         [0, 1, 1, 0],
                         [0, 1, 1, 1]]
    m_full = causal_mask(cache, 1, 4, None, "cpu")[0, 0].int().tolist()
    assert m_full[3] == [0, 1, 1, 1] and m_full[1] == [0, 1, 0, 0]


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


def test_experts_group_by_expert_equals_per_token_loop():
    torch.manual_seed(0)
    E, D, I, T, K = 5, 8, 6, 7, 2
    ex = Experts(E, D, I)
    torch.nn.init.normal_(ex.gate_up_proj)
    torch.nn.init.normal_(ex.down_proj)
    x = torch.randn(T, D)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    idx[:, 0] = 1  # expert 1 gets every token; some experts get none
    w = torch.rand(T, K)
    y = ex(x, idx, w)
    ref = torch.stack([sum(w[t, s] * expert_mlp(x[t:t + 1], ex.gate_up_proj[idx[t, s]], ex.down_proj[idx[t, s]])[0]
                           for s in range(K)) for t in range(T)])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_config_reads_both_layouts():
    base = {"model_type": "diffusion_gemma", "canvas_length": 32, "eos_token_id": [1, 106, 50],
            "text_config": {"hidden_size": 64, "num_hidden_layers": 6, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "head_dim": 16}}
    released = dict(base, text_config=dict(base["text_config"], global_head_dim=32, num_global_key_value_heads=1))
    c = DiffusionGemmaConfig.from_hf_dict(released)
    assert (c.layer_head_dim(5), c.layer_kv_heads(5), c.layer_head_dim(0), c.layer_kv_heads(0)) == (32, 1, 16, 2)
    newer = dict(base, text_config=dict(base["text_config"],
                                        per_layer_config={"5": {"head_dim": 32, "num_key_value_heads": 1}}))
    c2 = DiffusionGemmaConfig.from_hf_dict(newer)
    assert (c2.layer_head_dim(5), c2.layer_kv_heads(5), c2.layer_head_dim(4)) == (32, 1, 16)
    assert c2.canvas_length == 32 and c2.layer_types[5] == "full_attention"
    with pytest.raises(CheckpointError, match="'llama'"):
        DiffusionGemmaConfig.from_hf_dict({"model_type": "llama"})
    released_shape = DiffusionGemmaConfig()
    assert released_shape.layer_types.count("full_attention") == 5 and released_shape.layer_head_dim(29) == 512
