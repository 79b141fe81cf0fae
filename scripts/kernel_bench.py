"""One layer at the released shape, piece by piece: what each fast path costs and how close it comes.

  ceilings   device copy bandwidth and bf16 matmul rate, measured now
  moe        one layer's experts (256 canvas tokens, top-8 of 128): plain PyTorch, torch grouped_mm,
             the fused kernel in bf16 / int8 / int4; GB/s of expert weights read and the fraction of
             the copy bandwidth; relative error against the plain path; the same bits twice
  attention  the canvas attention as the plain path runs it (K/V repeated when there is a mask),
             SDPA's grouped-query path, and the kernel that reads the cache in place, at head_dim
             256 (8 kv heads, a full ring of 1023) and 512 (2 kv heads, 1024 and 4096 of a fixed
             buffer of 8192 behind a mask, as the CUDA graph's cache holds them)
  layer      one sliding and one full layer: plain eager, kernels eager, kernels in a CUDA graph;
             and how many kernels one layer launches (the profiler's count on a GPU; on the CPU the
             torch ops, each of which would be a launch)
Each row is printed and written to the JSON file as soon as it is measured (the timings of a layer
before its launch count is taken). --tiny runs the same sections at a small shape on any device
(the CPU rows only: no kernels there).

    python scripts/kernel_bench.py --tiny --device cpu --json /tmp/micro.json
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cuda_kernels  # noqa: E402
from attention import canvas_attention  # noqa: E402
from scripts.bench import TINY, device_ceilings, sync, timed  # noqa: E402
from model import Block, DiffusionGemmaConfig  # noqa: E402
from moe import Experts, Router  # noqa: E402
from quant import QuantExperts, quantize  # noqa: E402


def ms(fn, device, repeat=10) -> float:
    """Best milliseconds of fn over `repeat` runs after a warm-up."""
    return timed(fn, device, repeat) * 1e3


def rel(a, b) -> float:
    """Relative (Frobenius) error of a against b."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


class Out:
    """Results so far, printed and rewritten to the JSON file after every row."""

    def __init__(self, path):
        self.path, self.data = path, {}

    def add(self, section, key, value, line):
        self.data.setdefault(section, {})[key] = value
        print(line, flush=True)
        Path(self.path).write_text(json.dumps(self.data, indent=2))


def grouped_mm_experts(ex: Experts, x, idx, w):
    """torch's grouped GEMM over tokens sorted by expert (transformers' grouped_mm path)."""
    T, K = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=ex.num_experts), 0).int()
    xs = x[order // K]
    gate, up = F.grouped_mm(xs, ex.gate_up_proj.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    y = F.grouped_mm(F.gelu(gate, approximate="tanh") * up, ex.down_proj.transpose(1, 2), offs=offs)
    out = torch.empty(T * K, x.shape[1], dtype=torch.float32, device=x.device)
    out[order] = y * w.reshape(-1)[order, None]
    return out.view(T, K, -1).sum(1).to(x.dtype)


def bench_moe(cfg, device, dtype, out: Out, bandwidth: float):
    """The MoE of one layer: plain, grouped GEMM and the fused kernel (bf16, int8, int4), GB/s against the copy."""
    torch.manual_seed(0)
    E, D, I, K, T = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.top_k_experts, cfg.canvas_length
    ex = Experts(E, D, I).to(device=device, dtype=dtype)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.02)
    torch.nn.init.normal_(ex.down_proj, std=0.02)
    router = Router(D, E, K).to(device=device, dtype=dtype)
    torch.nn.init.normal_(router.proj.weight, std=0.02)
    x = torch.randn(T, D, device=device, dtype=dtype)
    w, idx = router(x)
    ref = ex(x, idx, w)
    weight_bytes = ex.gate_up_proj.numel() * 2 + ex.down_proj.numel() * 2
    rows = {"plain": lambda: ex(x, idx, w), "grouped_mm": lambda: grouped_mm_experts(ex, x, idx, w)}
    if device.type == "cuda":
        rows["fused bf16"] = lambda: cuda_kernels.experts_forward(ex, x, idx, w)
    for kind in ("int8", "int4") if device.type == "cuda" else ():
        q = QuantExperts(ex, kind, 64).to(device)
        for name in ("gate_up_proj", "down_proj"):
            for suffix, v in quantize(getattr(ex, name).data, kind, 64, True).items():
                setattr(q, name + suffix, v.to(device))
        rows[f"fused {kind}"] = (lambda q=q: cuda_kernels.experts_forward(q, x, idx, w))
    for name, fn in rows.items():
        try:
            t = ms(fn, device, 5 if name == "plain" else 20)
            got = fn()
        except Exception as e:  # a row that fails is reported, the others still run
            out.add("moe", name, {"error": str(e).splitlines()[0]}, f"moe {name}: FAILED {str(e).splitlines()[0]}")
            continue
        bytes_read = weight_bytes if "int" not in name else weight_bytes // (2 if "int8" in name else 4)
        gbs = bytes_read / (t / 1e3) / 1e9
        same = bool(torch.equal(got, fn()))
        out.add("moe", name, {"ms": t, "GBps": gbs, "fraction_of_copy": gbs / bandwidth, "relative_error": rel(got, ref),
                              "deterministic": same},
                f"moe {name:12s} {t:8.3f} ms  {gbs:8.1f} GB/s  {gbs / bandwidth:6.1%} of copy  rel err {rel(got, ref):.2e}"
                f"  same bits twice: {same}")


def bench_attention(cfg, device, dtype, out: Out, tiny: bool):
    """The canvas attention: the plain path, SDPA's grouped-query path and the kernel, by cache length."""
    C, H = cfg.canvas_length, cfg.num_attention_heads
    full_d, full_kv = cfg.layer_head_dim(cfg.num_hidden_layers - 1), cfg.layer_kv_heads(cfg.num_hidden_layers - 1)
    capacity = 512 if tiny else 8192
    shapes = [(cfg.head_dim, cfg.num_key_value_heads, cfg.sliding_window - 1, None),  # a full ring: no mask
              (full_d, full_kv, 64 if tiny else 1024, capacity), (full_d, full_kv, 256 if tiny else 4096, capacity)]
    for d, Hkv, filled, slots in shapes:
        torch.manual_seed(filled)
        T = slots or filled
        q = torch.randn(1, H, C, d, device=device, dtype=dtype) / d ** 0.25
        kc, vc = torch.randn(1, Hkv, T, d, device=device, dtype=dtype) / d ** 0.25, torch.randn(1, Hkv, T, d, device=device, dtype=dtype)
        kn, vn = torch.randn(1, Hkv, C, d, device=device, dtype=dtype) / d ** 0.25, torch.randn(1, Hkv, C, d, device=device, dtype=dtype)
        valid = None if slots is None else (torch.arange(T, device=device) < filled)[None]
        ref = canvas_attention(q, kc, vc, kn, vn, valid)
        fns = {"plain": lambda: canvas_attention(q, kc, vc, kn, vn, valid),
               "sdpa_gqa": lambda: cuda_kernels.gqa_canvas_attention(q, kc, vc, kn, vn, valid)}
        if device.type == "cuda":
            fns["kernel"] = lambda: cuda_kernels.canvas_attention(q, kc, vc, kn, vn, valid)
        row = {}
        for name, fn in fns.items():
            try:
                row[f"{name}_ms"], row[f"{name}_relative_error"] = ms(fn, device), rel(fn(), ref)
            except Exception as e:  # a row that fails is reported, the others still run
                row[f"{name}_error"] = str(e).splitlines()[0]
        out.add("attention", f"d{d}_kv{Hkv}_keys{filled}_of{T}", row, f"attention d={d} kv={Hkv} keys={filled} of {T}: "
                + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))


def count_ops(step) -> int:
    """The innermost torch ops one call of step runs (each would be a kernel launch on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))
    with Count():
        step()
    return Count.n


def bench_layers(cfg, device, dtype, out: Out):
    """A whole layer, plain and with the kernels: time and kernel launches."""
    from attention import rope_cos_sin, rope_inv_freq
    from kvcache import LayerCache
    C = cfg.canvas_length
    for i in (0, cfg.num_hidden_layers - 1):  # a sliding layer, a full layer
        torch.manual_seed(i)
        block = Block(cfg, i).to(device=device, dtype=dtype).eval()
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.02) if p.ndim > 1 else torch.nn.init.ones_(p)
        lc = LayerCache(None)
        Tc = min(cfg.sliding_window - 1, 1023)
        d, Hkv = cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
        lc.k = torch.randn(1, Hkv, Tc, d, device=device, dtype=dtype)
        lc.v = torch.randn(1, Hkv, Tc, d, device=device, dtype=dtype)
        p = cfg.rope_parameters[cfg.layer_types[i]]
        cos, sin = rope_cos_sin(rope_inv_freq(d, p["rope_theta"], p["rope_type"], p.get("partial_rotary_factor", 1.0)),
                                torch.arange(Tc, Tc + C, device=device)[None], dtype)
        h = torch.randn(1, C, cfg.hidden_size, device=device, dtype=dtype)
        step = lambda: block(h, cos, sin, lc, None, "canvas")  # noqa: E731
        name = f"layer {i} ({cfg.layer_types[i]})"
        row = {"plain_ms": ms(step, device, 5)}
        if device.type == "cuda":  # the fast path's pieces, as cuda_kernels.use_kernels sets them
            cuda_kernels.swap(block)
            row["kernels_ms"] = ms(step, device)
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                step()
            row["graph_ms"] = ms(graph.replay, device)
        out.add("layer", cfg.layer_types[i], dict(row), f"{name}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()))
        try:  # the count comes after the timings are safe in the file
            if device.type == "cuda":  # kernels the GPU ran
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    step()
                    sync(device)
                row["launches"] = len([e for e in prof.events() if e.device_type.name == "CUDA"])
            else:
                row["torch_ops"] = count_ops(step)
        except Exception as e:
            row["count_error"] = str(e).splitlines()[0]
        out.add("layer", cfg.layer_types[i], row, f"{name}: " + ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if not k.endswith("_ms")))


def build_parser() -> argparse.ArgumentParser:
    """The command line of kernel_bench.py."""
    p = argparse.ArgumentParser(description="One layer at the released shape, kernel by kernel.")
    p.add_argument("--tiny", action="store_true", help="a small shape, for any device")
    p.add_argument("--device", help="device (default: cuda when available)")
    p.add_argument("--json", default="micro.json", help="where to write the results")
    p.add_argument("--only", choices=["moe", "attention", "layer"], help="one section")
    return p


def main(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = DiffusionGemmaConfig(**TINY) if args.tiny else DiffusionGemmaConfig.from_name("26b-a4b")
    out = Out(args.json)
    ceilings = device_ceilings(device)
    bandwidth = ceilings["bandwidth_GBps"]
    out.add("ceilings", "device", {"name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                                   **ceilings},
            f"{device}: copy {bandwidth:.0f} GB/s, bf16 matmul {ceilings['bf16_TFLOPs']:.1f} TFLOP/s")
    for name, fn in (("moe", lambda: bench_moe(cfg, device, dtype, out, bandwidth)),
                     ("attention", lambda: bench_attention(cfg, device, dtype, out, args.tiny)),
                     ("layer", lambda: bench_layers(cfg, device, dtype, out))):
        if args.only in (None, name):
            with torch.no_grad():
                fn()
    return 0


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
