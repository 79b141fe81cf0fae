"""CUDA kernels against the plain PyTorch path they replace (skipped without a CUDA GPU), a compile-only
check (where nvcc and a CUDA build of torch exist), and the choice of path."""

import shutil

import pytest
import torch

import cuda_kernels
from attention import attend
from moe import Experts

HAS_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
CAN_COMPILE = shutil.which("nvcc") is not None and torch.version.cuda is not None
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (sm_80+)")


def report(name, got, ref):
    d = (got.float() - ref.float()).abs()
    print(f"{name}: max diff {d.max().item():.3e}, mean {d.mean().item():.3e}")


@pytest.mark.skipif(not CAN_COMPILE or HAS_GPU, reason="compile-only check: needs nvcc and a CUDA build of torch")
def test_kernels_compile_for_hopper(tmp_path):
    objects = cuda_kernels.compile_only("9.0a", tmp_path)
    assert [o.name for o in objects] == ["fused_moe.o", "attention.o"]
    assert all(o.stat().st_size > 10_000 for o in objects)


def test_choice_of_path_on_cpu():
    from model import DiffusionGemma, DiffusionGemmaConfig
    cfg = DiffusionGemmaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=16, global_head_dim=16, num_global_key_value_heads=1,
                               intermediate_size=32, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
                               layer_types=["sliding_attention", "full_attention"])
    net = DiffusionGemma(cfg)
    if not torch.cuda.is_available():
        assert cuda_kernels.use_kernels(net, "auto").startswith("kernels: torch (no CUDA device")
        with pytest.raises(cuda_kernels.KernelBuildError, match="needs a CUDA device"):
            cuda_kernels.use_kernels(net, "cuda")
    assert cuda_kernels.use_kernels(net, "torch") == "kernels: torch (asked for)"
    assert all(l.experts.kernel is None and l.self_attn.canvas_kernel is None for l in net.layers)


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
    report(f"moe T={T} E={E}", got, ref)
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("T", [5, 256])
def test_fused_moe_quantized_equals_plain_dequantizing_path(kind, T):
    from quantize import quantize
    torch.manual_seed(T)
    E, K, D, I = 16, 4, 256, 128
    ex = Experts(E, D, I).to(torch.bfloat16)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.05)
    torch.nn.init.normal_(ex.down_proj, std=0.05)
    full = {n: getattr(ex, n).data.clone() for n in ("gate_up_proj", "down_proj")}
    ex.quantize_(kind, 64)
    with torch.no_grad():
        for name, w in full.items():
            for suffix, v in quantize(w, kind, 64, True).items():
                getattr(ex, name + suffix).copy_(v)
    ex = ex.cuda()
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)])
    w = torch.rand(T, K, device="cuda")
    ref = ex(x, idx, w)  # the plain path dequantizes each expert, then multiplies
    got = cuda_kernels.experts_forward(ex, x, idx, w)
    report(f"moe {kind} T={T}", got, ref)
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.parametrize("prefix", [0, 1, 1023, 1024, 3000])
@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("H,Hkv,d", [(16, 8, 256), (16, 2, 512)])
def test_canvas_attention_equals_plain(prefix, B, H, Hkv, d):
    torch.manual_seed(prefix + B)
    C = 256
    bf = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(B, H, C, d, **bf) / d ** 0.25
    kc, vc = torch.randn(B, Hkv, prefix, d, **bf) / d ** 0.25, torch.randn(B, Hkv, prefix, d, **bf)
    kn, vn = torch.randn(B, Hkv, C, d, **bf) / d ** 0.25, torch.randn(B, Hkv, C, d, **bf)
    valid = None
    if B > 1 and prefix > 0:  # left padding in row 1
        valid = torch.ones(B, prefix, dtype=torch.bool, device="cuda")
        valid[1, : prefix // 2] = False
    mask = None if valid is None else torch.nn.functional.pad(valid, (0, C), value=True)[:, None, None, :].expand(
        -1, 1, C, -1)
    ref = attend(q, torch.cat([kc, kn], 2), torch.cat([vc, vn], 2), mask)
    got = cuda_kernels.canvas_attention(q, kc if prefix else None, vc if prefix else None, kn, vn, valid)
    report(f"attention prefix={prefix} B={B} d={d}", got, ref)
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)


@gpu
def test_whole_model_kernels_and_graph_equal_plain(ckpt_k):
    """A whole generation: the CUDA kernels with the CUDA graph commit the same canvases as the plain
    path (bf16, 8 fixed steps), and the denoiser logits agree."""
    from generate import block_diffusion, choose_fast_path, read_generation_config, settings_for
    from kvcache import KVCache
    from model import load_model
    path, _ = ckpt_k
    m = load_model(path, "cuda", torch.bfloat16)
    m.generation_settings = read_generation_config(path, m.config.eos_token_id)
    prompt = torch.arange(5, 60, device="cuda")[None]
    canvas = torch.arange(60, 92, device="cuda")[None]
    logits = {}
    for kind in ("torch", "cuda"):
        choose_fast_path(m, kind, announce=False)
        cache = KVCache(m.config.layer_types, m.config.sliding_window)
        with torch.no_grad():
            m.forward_causal(prompt, cache)
            logits[kind] = m.forward_canvas(canvas, cache)
    report("logits", logits["cuda"], logits["torch"])
    agree = (logits["cuda"].argmax(-1) == logits["torch"].argmax(-1)).float().mean().item()
    assert agree >= 0.99
    s = settings_for(m, max_new_tokens=64, steps=8)
    s.sampler.confidence_threshold = None
    torch.manual_seed(0)
    plain = block_diffusion(m, [prompt[0].tolist()], s, denoise=choose_fast_path(m, "torch", announce=False))
    torch.manual_seed(0)
    fast = block_diffusion(m, [prompt[0].tolist()], s, denoise=choose_fast_path(m, "cuda", announce=False))
    agree = (plain.sequences == fast.sequences).float().mean().item()
    assert agree >= 0.9, (plain.sequences, fast.sequences)
