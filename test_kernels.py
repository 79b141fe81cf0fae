"""CUDA kernels against the plain PyTorch path they replace (skipped without a CUDA GPU), a compile-only
check (where nvcc and a CUDA build of torch exist), and the choice of path (anywhere)."""

import shutil
from pathlib import Path

import pytest
import torch

import cuda_kernels
from attention import Attention, RMSNorm, canvas_attention
from conftest import test_config
from moe import Experts

HERE = Path(__file__).resolve().parent
HAS_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
CAN_COMPILE = shutil.which("nvcc") is not None and torch.version.cuda is not None
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (sm_80+)")


def report(name, got, ref) -> float:
    """Print the max and mean difference; return the relative (Frobenius) error."""
    d = (got.float() - ref.float()).abs()
    rel = ((got.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12)).item()
    print(f"{name}: max diff {d.max().item():.3e}, mean {d.mean().item():.3e}, relative {rel:.3e}")
    return rel


@pytest.mark.skipif(not CAN_COMPILE or HAS_GPU, reason="compile-only check: needs nvcc and a CUDA build of torch")
def test_kernels_compile_for_hopper(tmp_path):
    """The real build recipe, for sm_90a: compiles, links and imports (running needs a GPU)."""
    ext = cuda_kernels.compile_only("9.0a", tmp_path)
    assert callable(ext.fused_moe) and callable(ext.canvas_attention)
    assert {"fused_moe.cuda.o", "attention.cuda.o"} <= {p.name for p in tmp_path.iterdir()}


def test_choice_of_path_on_cpu():
    from model import DiffusionGemma
    net = DiffusionGemma(test_config("tiny"))
    if not torch.cuda.is_available():
        assert cuda_kernels.use_kernels(net, "auto").startswith("kernels: torch (no CUDA device")
        with pytest.raises(cuda_kernels.KernelBuildError, match="need a CUDA device"):
            cuda_kernels.use_kernels(net, "cuda")
    assert cuda_kernels.use_kernels(net, "torch") == "kernels: torch (asked for)"
    assert all(type(l.experts) is Experts and type(l.self_attn) is Attention for l in net.layers)  # left plain
    assert all(type(m) is RMSNorm for m in net.modules() if isinstance(m, RMSNorm))


def test_the_fast_classes_keep_what_their_subclasses_add():
    """A kernel replaces one method; a subclass's own methods stay (quantized storage, a rank's
    experts), and the plain class comes back."""
    from distributed import LocalExperts
    from quant import QuantExperts
    fused_quant = cuda_kernels.fast_class(QuantExperts, cuda_kernels.FusedExperts)
    assert fused_quant.forward is cuda_kernels.FusedExperts.forward
    assert fused_quant.expert_weights is QuantExperts.expert_weights
    fused_local = cuda_kernels.fast_class(LocalExperts, cuda_kernels.FusedExperts)
    assert fused_local.forward is LocalExperts.forward  # which calls on into the kernel ...
    assert fused_local.__mro__.index(cuda_kernels.FusedExperts) == fused_local.__mro__.index(LocalExperts) + 1
    assert cuda_kernels.fast_class(QuantExperts, cuda_kernels.FusedExperts) is fused_quant  # made once
    assert cuda_kernels.fast_class(fused_quant, cuda_kernels.FusedExperts) is fused_quant  # switched already


def test_shapes_the_kernels_take():
    from model import DiffusionGemmaConfig
    from sudoku import SUDOKU_9
    assert cuda_kernels.shapes_fit(DiffusionGemmaConfig()) and cuda_kernels.shapes_fit(DiffusionGemmaConfig.from_name("small"))
    assert not cuda_kernels.shapes_fit(DiffusionGemmaConfig(**SUDOKU_9))  # a vocabulary of 733: not a multiple of 4
    assert not cuda_kernels.shapes_fit(test_config("test-b"))  # hidden 48


@gpu
@pytest.mark.parametrize("T", [1, 7, 256, 1024 + 3])
@pytest.mark.parametrize("E,K,D,I", [(8, 2, 128, 64), (128, 8, 256, 128)])
def test_fused_moe_equals_plain(T, E, K, D, I):
    torch.manual_seed(T + E)
    ex = Experts(E, D, I).cuda().to(torch.bfloat16)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.05)
    torch.nn.init.normal_(ex.down_proj, std=0.05)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(E - 1, device="cuda")[:K] for _ in range(T)])
    idx[idx >= 3] += 1  # expert 3 gets no token
    w = torch.rand(T, K, device="cuda")
    ref = ex(x, idx, w)
    got = cuda_kernels.experts_forward(ex, x, idx, w)
    assert report(f"moe T={T} E={E}", got, ref) < 1e-2
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(got, cuda_kernels.experts_forward(ex, x, idx, w))  # the same bits every run


@gpu
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("T", [5, 256])
def test_fused_moe_quantized_equals_plain_dequantizing_path(kind, T):
    from quant import QuantExperts, quantize
    torch.manual_seed(T)
    E, K, D, I = 16, 4, 256, 128
    dense = Experts(E, D, I).to(torch.bfloat16)
    torch.nn.init.normal_(dense.gate_up_proj, std=0.05)
    torch.nn.init.normal_(dense.down_proj, std=0.05)
    ex = QuantExperts(dense, kind, 64)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            for suffix, v in quantize(getattr(dense, name).data, kind, 64, True).items():
                getattr(ex, name + suffix).copy_(v)
    ex = ex.cuda()
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)])
    w = torch.rand(T, K, device="cuda")
    ref = ex(x, idx, w)  # the plain path dequantizes each expert, then multiplies
    got = cuda_kernels.experts_forward(ex, x, idx, w)
    assert report(f"moe {kind} T={T}", got, ref) < 1e-2


@gpu
@pytest.mark.parametrize("prefix", [0, 1, 1023, 1024, 3000])
@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("H,Hkv,d", [(16, 8, 256), (16, 2, 512)])
def test_canvas_attention_equals_plain(prefix, B, H, Hkv, d):
    torch.manual_seed(prefix + B)
    C = 256
    bf = dict(device="cuda", dtype=torch.bfloat16)
    q = 2 * torch.randn(B, H, C, d, **bf) / d ** 0.25  # peaky scores: a dropped key shows
    kc, vc = torch.randn(B, Hkv, prefix, d, **bf) / d ** 0.25, torch.randn(B, Hkv, prefix, d, **bf)
    kn, vn = torch.randn(B, Hkv, C, d, **bf) / d ** 0.25, torch.randn(B, Hkv, C, d, **bf)
    valid = None
    if B > 1 and prefix > 0:  # left padding in row 1
        valid = torch.ones(B, prefix, dtype=torch.bool, device="cuda")
        valid[1, : prefix // 2] = False
    cache = (kc, vc) if prefix else (None, None)
    ref = canvas_attention(q, *cache, kn, vn, valid)
    got = cuda_kernels.canvas_attention(q, *cache, kn, vn, valid)
    assert report(f"attention prefix={prefix} B={B} d={d}", got, ref) < 5e-3
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)


@gpu
def test_whole_model_graph_equals_eager_and_kernels_track_plain():
    """The bundled code model (its sizes fit the kernels): with the kernels, the CUDA graphs commit
    exactly what eager steps commit (per-row seeds and the shared stream); the kernels' logits stay
    within 1e-2 of the plain path's."""
    from generate import choose_fast_path, load, settings_for
    from kvcache import KVCache
    from sampler import block_diffusion
    m, tok = load(HERE / "weights-code", "cuda", torch.bfloat16)
    prompt = torch.tensor([tok.encode_raw("def fibonacci(n):\n")], device="cuda")
    canvas = torch.randint(0, m.config.vocab_size, (1, m.config.canvas_length), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(0))
    logits = {}
    for kind in ("torch", "cuda"):
        choose_fast_path(m, kind)
        cache = KVCache(m.config.layer_types, m.config.sliding_window)
        with torch.no_grad():
            m.forward_causal(prompt, cache)
            logits[kind] = m.forward_canvas(canvas, cache)
    assert report("logits kernels vs plain", logits["cuda"], logits["torch"]) < 1e-2
    s = settings_for(m, max_new_tokens=2 * m.config.canvas_length, steps=8)
    graph, _ = choose_fast_path(m, "cuda", cuda_graph=True)
    eager, _ = choose_fast_path(m, "cuda", cuda_graph=False)  # the same kernels and fused sampler, no graph
    prompts = [prompt[0].tolist(), tok.encode_raw("import os\n")]
    for seeds in (None, [3, 4]):
        out = {}
        for name, fast in (("eager", eager), ("graph", graph)):
            torch.manual_seed(0)
            out[name] = block_diffusion(m, prompts, s, seeds=seeds, **fast)
        assert torch.equal(out["eager"].sequences, out["graph"].sequences), seeds
        assert out["eager"].steps == out["graph"].steps


def keys(n, seed=0):
    return torch.randint(0, 2 ** 62, (n,), device="cuda", generator=torch.Generator("cuda").manual_seed(seed))


@gpu
def test_fused_sampler_pass_equals_plain():
    """Scaled logits, argmax and entropy exactly as sampler.logit_stats computes them (a true
    division by T); the same keys, the same samples and noise; NaN rows give a NaN entropy."""
    from sampler import entropy
    torch.manual_seed(0)
    B, C, V = 2, 64, 4096
    raw = torch.tanh(torch.randn(B, C, V, device="cuda") * 2) * 30
    T = torch.tensor(0.6, device="cuda")
    sampled, argmax, h, sc, noise = cuda_kernels.sampler_stats(raw, T, keys(B))
    x = raw / T
    assert torch.equal(argmax, x.argmax(-1)) and torch.equal(sc, x.to(torch.bfloat16))
    torch.testing.assert_close(h, entropy(x), atol=1e-4, rtol=1e-4)
    again = cuda_kernels.sampler_stats(raw, T, keys(B))
    assert torch.equal(again[0], sampled) and torch.equal(again[4], noise)  # the same keys, the same draws
    other = cuda_kernels.sampler_stats(raw, T, keys(B, seed=1))
    assert not torch.equal(other[4], noise) and noise.min() >= 0 and noise.max() < V
    raw[0, 3, 7] = float("nan")
    assert torch.isnan(cuda_kernels.sampler_stats(raw, T, keys(B))[2][0, 3])


@gpu
def test_fused_sampler_pass_takes_a_restriction():
    """Logits restricted to a token set (-inf elsewhere, sampler.restrict): the fused pass samples
    and picks only allowed tokens there, its entropy is the plain one over them, nothing is NaN."""
    from sampler import entropy, restrict
    from structured import Allowed
    torch.manual_seed(0)
    B, C, V = 2, 64, 4096
    ids = torch.randperm(V)[:37].tolist()
    allowed = Allowed([ids], [{j: 0 for j in range(0, C, 2)}]).for_canvas(0, B, C, V, "cuda")
    raw = restrict(torch.randn(B, C, V, device="cuda") * 4, allowed)
    T = torch.tensor(0.8, device="cuda")
    sampled, argmax, h, sc, noise = cuda_kernels.sampler_stats(raw, T, keys(B))
    inside = torch.tensor(ids, device="cuda")
    assert torch.isin(sampled[:, ::2], inside).all() and torch.isin(argmax[:, ::2], inside).all()
    assert torch.isfinite(h).all() and torch.equal(argmax, (raw / T).argmax(-1))
    torch.testing.assert_close(h, entropy(raw / T), atol=1e-4, rtol=1e-4)


@gpu
def test_typed_canvases_on_the_fast_path():
    """editing.fill_json with the kernels (restricted canvases run eagerly, pinned-only
    repair canvases in the graph): every output of the first schemas of the suite validates."""
    import json
    from generate import choose_fast_path, load
    from editing import fill_json
    from structured import validate
    m, tok = load(HERE / "weights-code", "cuda", torch.bfloat16)
    fast, _ = choose_fast_path(m, "cuda")
    suite = json.loads((HERE / "scripts" / "schema_suite.json").read_text())
    for schema in suite[:12]:
        for seed in range(3):
            f = fill_json(m, tok, tok.encode_raw("def f(x):"), schema, seed=seed, **fast)
            assert validate(json.loads(f.text), schema) is None, (schema, f.text)  # (no jsonschema on every GPU box)


@gpu
def test_fused_samples_follow_softmax():
    """Chi-square against softmax on a few logits (Gumbel-max is exact), and, at the released
    vocabulary, no sample far below its row's maximum (a uniform of exactly 1 once made the Gumbel
    score +inf, so 1.5% of rows sampled a uniformly random token)."""
    few = torch.tensor([0.0, 1.0, 2.0, -1.0] * 2, device="cuda").repeat(8192, 1)[None]  # (1, 8192, 8)
    counts = torch.bincount(cuda_kernels.sampler_stats(few, torch.tensor(1.0, device="cuda"), keys(1))[0].flatten(),
                            minlength=8).double()
    expect = torch.softmax(few[0, 0].double(), -1) * few.shape[1]
    chi2 = ((counts - expect) ** 2 / expect).sum().item()
    assert chi2 < 24.3, (counts, expect)  # 7 degrees of freedom: p = 0.001
    V = 262144
    raw = torch.randn(8, 256, V, device="cuda")
    peak = torch.randint(0, V, (8, 256), device="cuda")
    raw.scatter_(-1, peak[..., None], 30.0)  # softmax puts all but e^-17 of each row on its peak
    sampled, _, _, _, noise = cuda_kernels.sampler_stats(raw, torch.tensor(1.0, device="cuda"), keys(8))
    assert (sampled != peak).sum().item() <= 2  # the bug: about 32 of these 2048 rows
    assert noise.float().mean().item() == pytest.approx(V / 2, rel=0.05)  # uniform over the vocabulary (3.9 sigma)


@gpu
@pytest.mark.parametrize("D,with_scale", [(256, True), (512, False), (2816, True)])
def test_rms_norm_equals_plain(D, with_scale):
    from attention import RMSNorm
    torch.manual_seed(D)
    norm = RMSNorm(D, 1e-6, with_scale).cuda().to(torch.bfloat16)
    if with_scale:
        torch.nn.init.normal_(norm.weight, 1.0, 0.3)
    x = torch.randn(3, 77, D, device="cuda", dtype=torch.bfloat16) * 4
    ref = norm(x)
    got = cuda_kernels.rms_norm(x, norm.weight, 1e-6)
    assert report(f"rmsnorm D={D}", got, ref) < 5e-3
    assert (got != ref).float().mean() < 0.01  # the same bf16 almost everywhere: only the sum's order differs


def bf(x):
    """As a bf16 PyTorch op rounds its fp32 result."""
    return x.to(torch.bfloat16)


class StandIn:
    """A stand-in for the extension on the CPU: fused_ops.cu's kernels step for step in torch (every
    bf16 rounding where the kernel rounds), the older kernels by what they replace. It checks the
    plumbing (which tensors go in, in which layout, where the results go) and that the fused order
    of operations is the plain path's; the kernels themselves are checked on a GPU below."""

    @staticmethod
    def norm(x, w, eps):
        f = x.float()
        f = f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)
        return bf(f if w is None or w.numel() == 0 else f * w.float())

    def rms_norm(self, x, w, eps):
        return self.norm(x, w, eps)

    def post_ffn(self, h, dense, routed, w1, w2, w, scalar, eps):
        s = bf(self.norm(dense, w1, eps).float() + self.norm(routed, w2, eps).float())
        return bf(bf(h.float() + self.norm(s, w, eps).float()).float() * scalar.float())

    def qk_norm_rope(self, x, w, cos, sin, eps):
        n = self.norm(x, w, eps).float()
        lo, hi = n.chunk(2, dim=-1)
        cl, ch = cos.float()[None, :, None].chunk(2, dim=-1)
        sl, sh = sin.float()[None, :, None].chunk(2, dim=-1)
        return bf(torch.cat([bf(lo * cl).float() + bf(-hi * sl).float(), bf(hi * ch).float() + bf(lo * sh).float()], -1))

    def softcap(self, x, cap):
        return torch.tanh(x.float() / cap) * cap

    def router_tail(self, logits, scale, k):
        weights, idx = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), k=k, dim=-1)
        return [weights / weights.sum(-1, keepdim=True) * scale[idx], idx]

    def fused_moe(self, x, token, assign, weight, offsets, gate_up, _s, _z, down, _ds, _dz, fmt, group, I):
        from moe import expert_mlp
        out = torch.zeros(len(assign), x.shape[1])
        for e in range(len(offsets) - 1):
            a = slice(int(offsets[e]), int(offsets[e + 1]))
            if a.start < a.stop:
                out[assign[a].long()] = expert_mlp(x[token[a].long()], gate_up[e], down[e]).float() * weight[a, None]
        return out


def test_fused_glue_on_a_stand_in_extension(monkeypatch):
    """The model switched to the kernels (a stand-in extension, on the CPU) gives the plain path's
    logits; the swap covers the layers and the head, and a second swap changes nothing."""
    from kvcache import KVCache
    from model import DiffusionGemma, init_weights
    model = init_weights(DiffusionGemma(test_config("test-kernels")), std=0.3, seed=2).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.normal_(1.0, 0.2)  # norms that differ, so a swapped weight shows
    prompt, canvas = torch.arange(3, 50)[None], torch.arange(100, 132)[None]

    def logits():
        cache = KVCache(model.config.layer_types, model.config.sliding_window)
        with torch.no_grad():
            model.forward_causal(prompt, cache)
            return model.forward_canvas(canvas, cache)

    plain = logits()
    monkeypatch.setattr(cuda_kernels, "build", lambda *a, **k: StandIn())
    cuda_kernels.swap(model)
    assert type(model) is cuda_kernels.FusedHead and all(type(layer) is cuda_kernels.FusedBlock for layer in model.layers)
    assert all(type(layer.self_attn) is cuda_kernels.GQAAttention and type(layer.router) is cuda_kernels.FusedRouter
               for layer in model.layers)
    fast = logits()
    assert report("stand-in kernels vs plain", fast, plain) < 1e-3  # equal here: the same roundings
    assert (fast.argmax(-1) == plain.argmax(-1)).float().mean() > 0.9
    cuda_kernels.swap(model)  # once switched, a second switch changes nothing
    assert type(model) is cuda_kernels.FusedHead and torch.equal(logits(), fast)


@gpu
@pytest.mark.parametrize("D", [128, 2816])
def test_post_ffn_equals_the_plain_layer_end(D):
    from model import Block
    torch.manual_seed(D)
    block = Block(test_config("test-kernels", hidden_size=D), 0).cuda().to(torch.bfloat16)
    with torch.no_grad():
        for n in (block.post_feedforward_layernorm, block.post_feedforward_layernorm_1, block.post_feedforward_layernorm_2):
            n.weight.normal_(1.0, 0.3)
        block.layer_scalar.fill_(0.83)
    h, dense, routed = (torch.randn(2, 37, D, device="cuda", dtype=torch.bfloat16) * s for s in (5, 0.3, 2))
    ref = block.combine(h, dense, routed)
    got = cuda_kernels.post_ffn(block, h, dense, routed)
    assert report(f"post_ffn D={D}", got, ref) < 5e-3
    assert (got != ref).float().mean() < 0.02  # the same bf16 almost everywhere: only the sums' order differs


@gpu
@pytest.mark.parametrize("d,heads,rope", [(16, 4, "default"), (256, 8, "default"), (512, 2, "proportional")])
def test_norm_rope_equals_plain(d, heads, rope):
    from attention import apply_rope, rope_cos_sin, rope_inv_freq
    torch.manual_seed(d)
    norm = RMSNorm(d, 1e-6).cuda().to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    x = torch.randn(2, 33, heads, d, device="cuda", dtype=torch.bfloat16) * 3
    freq = rope_inv_freq(d, 1e6 if rope == "proportional" else 1e4, rope, 0.25 if rope == "proportional" else 1.0)
    cos, sin = rope_cos_sin(freq.cuda(), torch.arange(1000, 1033, device="cuda")[None], torch.bfloat16)
    ref = apply_rope(norm(x), cos, sin)
    got = cuda_kernels.norm_rope(x, norm, cos, sin)
    assert report(f"norm + rope d={d}", got, ref) < 5e-3
    assert (got != ref).float().mean() < 0.02


@gpu
@pytest.mark.parametrize("E,K", [(128, 8), (8, 2), (200, 3)])
def test_router_tail_equals_plain(E, K):
    from moe import Router
    torch.manual_seed(E)
    router = Router(256, E, K).cuda().to(torch.bfloat16)
    with torch.no_grad():
        router.proj.weight.normal_(0, 0.5)
        router.per_expert_scale.uniform_(0.5, 1.5)
    h = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16)
    w_ref, i_ref = router(h)
    w, i = cuda_kernels.route(router, h)
    # compared expert by expert, not slot by slot: torch.topk may order tied experts either way
    si, oi = i.sort(dim=-1)
    sr, orf = i_ref.sort(dim=-1)
    same = (si == sr).all(dim=-1)
    assert same.float().mean() > 0.995  # a row may differ only where two probabilities tie in fp32
    torch.testing.assert_close(w.gather(-1, oi)[same], w_ref.gather(-1, orf)[same], atol=1e-6, rtol=1e-5)


@gpu
def test_router_tail_keeps_ids_in_range_on_nan():
    """NaN router logits (a NaN hidden state) give valid expert ids, not an out-of-range read: the NaN
    goes on to the logits, where the sampler stops with its one-line error."""
    from moe import Router
    router = Router(256, 128, 8).cuda().to(torch.bfloat16)
    h = torch.full((4, 256), float("nan"), device="cuda", dtype=torch.bfloat16)
    w, i = cuda_kernels.route(router, h)
    torch.cuda.synchronize()
    assert ((i >= 0) & (i < 128)).all()


@gpu
def test_softcap_equals_plain():
    x = torch.randn(2, 256, 1000, device="cuda", dtype=torch.bfloat16) * 40
    got = cuda_kernels.build().softcap(x, 30.0)
    torch.testing.assert_close(got, torch.tanh(x.float() / 30.0) * 30.0, atol=2e-5, rtol=0)
