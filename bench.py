"""Benchmark the denoising step: transformers vs ours (plain PyTorch) vs ours (CUDA kernels + CUDA graph).

At the released shape (SPEC §1) with random bf16 weights built directly on the GPU: a 1024-token
prompt, 16 fixed denoising steps per canvas (no early stop, no EOS), 2 canvases. The three systems
share one set of weight tensors (transformers builds them; ours points at the same memory).

Per-canvas time is measured as time(2 canvases) - time(1 canvas), so the prompt prefill drops out;
a canvas costs its 16 steps plus one commit pass of the same size: ms/step = per-canvas / 17 and
tok/s = 256 / per-canvas. The same run measures the device's copy bandwidth and bf16 matmul rate;
the floor of a step is the bytes of weights it must read / the bandwidth.

    python bench.py               # released shape on the GPU (about 52 GB)
    python bench.py --tiny        # a tiny shape, runs anywhere (the CPU)
    python bench.py --quant int4  # bf16 vs int4 experts in one run: speed, logit error, argmax agreement
    python bench.py --quant int4 --memory   # peak memory of the int4 model generating from a 4k prompt
"""

import argparse
import json
import sys
import time

import torch

from generate import GenerationSettings, block_diffusion, choose_fast_path, denoise_canvas
from kvcache import KVCache
from model import DiffusionGemma, DiffusionGemmaConfig, PREFIX
from sampler import SamplerSettings

TINY = dict(vocab_size=512, hidden_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, num_global_key_value_heads=1, global_head_dim=64, intermediate_size=128, num_experts=8,
            top_k_experts=2, moe_intermediate_size=64, sliding_window=64, canvas_length=32)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat=3):
    fn()  # warm-up (kernel builds, allocator)
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def device_ceilings(device) -> dict:
    """Copy bandwidth (read + write bytes / s) and bf16 matmul rate, measured now."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t = timed(lambda: b.copy_(a), device, 5)
    bw = 2 * n / t
    del a, b
    m = 8192 if device.type == "cuda" else 1024
    x = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    t = timed(lambda: x @ x, device, 5)
    return {"bandwidth_GBps": bw / 1e9, "bf16_TFLOPs": 2 * m ** 3 / t / 1e12}


def step_bytes(model) -> int:
    """Bytes one step reads, for any weight format: every parameter and buffer, plus the embedding
    twice more (tied head and self-conditioning)."""
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    E = model.embedding_matrix()
    return total + 2 * E.numel() * E.element_size()


def build_hf(cfg: DiffusionGemmaConfig, device, dtype):
    """transformers' model with random weights, built directly on the device."""
    from transformers import DiffusionGemmaConfig as HFConfig, DiffusionGemmaForBlockDiffusion
    d = cfg.to_hf_dict()
    hf_cfg = HFConfig(text_config=d["text_config"], vision_config=d["vision_config"],
                      canvas_length=cfg.canvas_length, eos_token_id=cfg.eos_token_id)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = DiffusionGemmaForBlockDiffusion(hf_cfg).eval()
    finally:
        torch.set_default_dtype(old)
    return hf


def ours_sharing(hf, cfg: DiffusionGemmaConfig, device) -> DiffusionGemma:
    """Our model over the very tensors of the transformers model (no second copy)."""
    with torch.device("meta"):
        net = DiffusionGemma(cfg)
    hf_state = hf.state_dict()
    state = {k: hf_state[PREFIX + k] for k in net.state_dict()}
    net.load_state_dict(state, assign=True, strict=True)
    net.inv_freq = {t: f.to(device) for t, f in net.inv_freq.items()}
    return net.eval().requires_grad_(False)


@torch.no_grad()
def parity(hf, ours, prompt, C, steps, denoise) -> dict:
    """Ours against transformers on the same weights: denoiser logits on one canvas (argmax agreement,
    max difference) and the committed canvas of a seeded generation at `steps` fixed steps."""
    V = ours.config.vocab_size
    canvas = torch.randint(0, V, (1, C), device=prompt.device, generator=torch.Generator(prompt.device).manual_seed(1))
    ref = hf(input_ids=prompt, decoder_input_ids=canvas).logits
    cache = KVCache(ours.config.layer_types, ours.config.sliding_window)
    ours.forward_causal(prompt, cache)
    got = ours.forward_canvas(canvas, cache)
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    max_diff = (ref - got).abs().max().item()
    del ref, got, cache
    torch.manual_seed(0)
    hf_tokens = hf.generate(prompt, max_new_tokens=C, max_denoising_steps=steps, confidence_threshold=None,
                            eos_token_id=None).sequences[:, -C:]
    torch.manual_seed(0)
    s = GenerationSettings(max_new_tokens=C, eos_token_ids=(), sampler=SamplerSettings(max_steps=steps,
                                                                                        confidence_threshold=None))
    our_tokens = block_diffusion(ours, [prompt[0].tolist()], s, denoise=denoise).sequences[:, -C:]
    return {"argmax_agreement": agree, "max_logit_diff": max_diff,
            "committed_identical": bool(torch.equal(hf_tokens, our_tokens)),
            "committed_agreement": (hf_tokens == our_tokens).float().mean().item()}


VLLM_FP8_TOK_S = 1756  # vLLM blog, FP8 weights, H100, batch 1, 16 fixed steps, 4k prompt


def random_model(cfg: DiffusionGemmaConfig, device, dtype) -> DiffusionGemma:
    """Our model with random weights, built directly on the device."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            net = DiffusionGemma(cfg)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02) if p.ndim >= 2 else p.fill_(1.0)
    net.inv_freq = {t: f.to(device) for t, f in net.inv_freq.items()}
    return net.eval().requires_grad_(False)


@torch.no_grad()
def bench_quant(a, device, cfg, ceilings) -> dict:
    from quantize import quantized_copy
    q = {"experts": a.quant, "group_size": a.group_size, "zero_point": True, "attention": None, "mlp": None,
         "embedding": None}
    C, steps = cfg.canvas_length, a.steps
    s = lambda n: GenerationSettings(max_new_tokens=n * C, eos_token_ids=(),
                                     sampler=SamplerSettings(max_steps=steps, confidence_threshold=None))
    if a.memory:  # the quantized model alone, never the whole bf16 one
        qm = quantized_copy(random_model(cfg, device, torch.bfloat16), q, free_source=True)
        denoise = choose_fast_path(qm, "auto", announce=True)
        prompt = torch.randint(5, cfg.vocab_size, (a.prompt or 4096,)).tolist()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        block_diffusion(qm, [prompt], s(1), denoise=denoise)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
        print(f"{a.quant} experts: peak memory {peak:.2f} GiB generating one canvas from a {len(prompt)}-token prompt")
        return {"quant": a.quant, "prompt_tokens": len(prompt), "peak_GiB": peak}
    model = random_model(cfg, device, torch.bfloat16)
    qm = quantized_copy(model, q)
    prompt = torch.randint(5, cfg.vocab_size, (1, a.prompt or (128 if a.tiny else 1024)), device=device)
    canvas = torch.randint(0, cfg.vocab_size, (1, C), device=device)
    rows, logits = [], []
    for name, m in (("bf16", model), (a.quant + " experts", qm)):
        denoise = choose_fast_path(m, "auto", announce=True)
        rows.append(measure(name, lambda n, m=m, d=denoise: (lambda: block_diffusion(m, [prompt[0].tolist()], s(n),
                                                                                        denoise=d)), device, steps, C))
        rows[-1]["floor_ms_per_step"] = step_bytes(m) / (ceilings["bandwidth_GBps"] * 1e9) * 1e3
        cache = KVCache(cfg.layer_types, cfg.sliding_window)
        m.forward_causal(prompt, cache)
        logits.append(m.forward_canvas(canvas, cache))
    rel = ((logits[1] - logits[0]).norm() / logits[0].norm()).item()
    agree = (logits[1].argmax(-1) == logits[0].argmax(-1)).float().mean().item()
    print(f"| weights | ms/step | tok/s | own floor ms/step | x bf16 |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['ms_per_step']:.2f} | {r['tok_s']:.0f} | {r['floor_ms_per_step']:.2f} | "
              f"{rows[0]['ms_per_step'] / r['ms_per_step']:.2f} |")
    print(f"vLLM FP8 (published, H100, 16 steps): {VLLM_FP8_TOK_S} tok/s")
    print(f"{a.quant} vs bf16: relative logit error {rel:.4f}, denoiser argmax agreement {agree:.4%}")
    return {"quant": a.quant, "rows": rows, "relative_logit_error": rel, "argmax_agreement": agree,
            "vllm_fp8_tok_s": VLLM_FP8_TOK_S}


def main(a) -> int:
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not a.tiny and device.type != "cuda":
        print("error: the released shape needs a CUDA GPU with about 60 GB; use --tiny on this machine", file=sys.stderr)
        return 2
    dtype = torch.bfloat16
    cfg = DiffusionGemmaConfig(**(TINY if a.tiny else {}))
    cfg.dtype = "bfloat16"
    prompt_len = a.prompt if a.prompt else (128 if a.tiny else 1024)
    steps = a.steps
    C = cfg.canvas_length
    torch.manual_seed(0)
    ceilings = device_ceilings(device)
    if a.quant:
        report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", **ceilings,
                  **bench_quant(a, device, cfg, ceilings)}
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
        return 0
    hf = build_hf(cfg, device, dtype)
    ours = ours_sharing(hf, cfg, device)
    prompt = torch.randint(5, cfg.vocab_size, (1, prompt_len), device=device)
    floor_s = step_bytes(ours) / (ceilings["bandwidth_GBps"] * 1e9)

    def settings(n_canvas):
        return GenerationSettings(max_new_tokens=n_canvas * C, eos_token_ids=(),
                                  sampler=SamplerSettings(max_steps=steps, confidence_threshold=None))

    def run_hf(n_canvas):
        return lambda: hf.generate(prompt, max_new_tokens=n_canvas * C, max_denoising_steps=steps,
                                   confidence_threshold=None, eos_token_id=None)

    def run_ours(n_canvas, denoise):
        return lambda: block_diffusion(ours, [prompt[0].tolist()], settings(n_canvas), denoise=denoise)

    systems = [("transformers 5.17.0", run_hf)]
    choose_fast_path(ours, "torch", announce=False)
    systems.append(("ours, plain PyTorch", lambda n: run_ours(n, denoise_canvas)))
    rows, checks = [], {}
    with torch.no_grad():
        for name, make in systems:
            rows.append(measure(name, make, device, steps, C))
        checks["plain"] = parity(hf, ours, prompt, C, steps, denoise_canvas)
        if device.type == "cuda":
            fast = choose_fast_path(ours, "cuda", cuda_graph=not a.no_cuda_graph, announce=True)
            rows.append(measure("ours, CUDA kernels + graph", lambda n: run_ours(n, fast), device, steps, C))
            checks["kernels"] = parity(hf, ours, prompt, C, steps, fast)
    base = rows[0]["ms_per_step"]
    for r in rows:
        r["speedup_vs_transformers"] = base / r["ms_per_step"]
        r["floor_fraction"] = floor_s * 1e3 / r["ms_per_step"]
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "shape": "tiny" if a.tiny else "released 26B-A4B", "prompt_tokens": prompt_len, "steps": steps,
              "canvas_length": C, "weight_bytes_per_step": step_bytes(ours), "floor_ms_per_step": floor_s * 1e3,
              **ceilings, "rows": rows, "parity": checks}
    print(f"device {report['device']}, {report['shape']}, prompt {prompt_len}, {steps} steps/canvas, canvas {C}")
    print(f"copy bandwidth {ceilings['bandwidth_GBps']:.0f} GB/s, bf16 matmul {ceilings['bf16_TFLOPs']:.1f} TFLOP/s, "
          f"floor {floor_s * 1e3:.2f} ms/step ({step_bytes(ours) / 1e9:.2f} GB of weights)")
    print(f"| system | ms/step | tok/s | × transformers | floor / step | peak memory |\n|---|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_GiB']:.2f} GiB" if device.type == "cuda" else "n/a"
        print(f"| {r['system']} | {r['ms_per_step']:.2f} | {r['tok_s']:.0f} | {r['speedup_vs_transformers']:.2f} | "
              f"{r['floor_fraction']:.3f} | {peak} |")
    for path, c in checks.items():
        print(f"parity with transformers ({path}): denoiser argmax agreement {c['argmax_agreement']:.4%}, "
              f"max logit diff {c['max_logit_diff']:.3g}, committed canvas "
              f"{'identical' if c['committed_identical'] else 'agreement %.2f%%' % (100 * c['committed_agreement'])}")
    with open(a.json, "w") as f:
        json.dump(report, f, indent=2)
    return 0


def measure(name, make, device, steps, C) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t1 = timed(make(1), device, 2)
    t2 = timed(make(2), device, 2)
    per_canvas = max(t2 - t1, 1e-9)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    return {"system": name, "ms_per_canvas": per_canvas * 1e3, "ms_per_step": per_canvas * 1e3 / (steps + 1),
            "tok_s": C / per_canvas, "peak_GiB": peak}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Denoising-step benchmark: transformers vs plain PyTorch vs CUDA kernels.")
    p.add_argument("--tiny", action="store_true", help="a tiny shape that runs anywhere (the CPU)")
    p.add_argument("--steps", type=int, default=16, help="fixed denoising steps per canvas (default 16)")
    p.add_argument("--prompt", type=int, help="prompt tokens (default 1024; 128 with --tiny)")
    p.add_argument("--device", help="device (default: cuda when available)")
    p.add_argument("--no-cuda-graph", action="store_true", help="kernels without the CUDA graph")
    p.add_argument("--json", default="bench.json", help="where to write the results (default bench.json)")
    p.add_argument("--quant", choices=["int8", "int4"], help="compare bf16 with int8/int4 experts instead")
    p.add_argument("--group-size", type=int, default=64, help="int4 group size (default 64)")
    p.add_argument("--memory", action="store_true", help="with --quant: peak memory from a 4k prompt, alone")
    sys.exit(main(p.parse_args()))
