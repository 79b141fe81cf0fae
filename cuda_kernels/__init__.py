"""Hand-written CUDA kernels for the denoising step, and the one place where a model is switched to them.

  fused_moe.cu   the 128 experts as one grouped GEMM over tokens sorted by expert
  attention.cu   the canvas's bidirectional attention over [cached prefix ; canvas]
  bindings.cpp   their Python bindings

The kernels are built on first use with torch.utils.cpp_extension.load and cached (by default under
~/.cache/torch_extensions); Hopper gets sm_90a, other GPUs their own architecture. They have the
same signatures as the plain PyTorch functions they replace (moe.Experts.forward, attention.attend
for the canvas) and are tested against them (test_kernels.py).

    from cuda_kernels import use_kernels
    print(use_kernels(model, "auto"))    # "kernels: cuda ✓ (NVIDIA H100 ...)" or "kernels: torch (no CUDA device)"

A failed build on a GPU machine is an error with the compiler's message, never a silent fallback.
"""

import os
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
SOURCES = [HERE / "bindings.cpp", HERE / "fused_moe.cu", HERE / "attention.cu"]
_ext = None


class KernelBuildError(RuntimeError):
    """nvcc failed; the message carries its output."""


def arch_for(capability: tuple[int, int]) -> str:
    """TORCH_CUDA_ARCH_LIST entry: 9.0a (wgmma-capable Hopper) on sm_90, else the device's own."""
    major, minor = capability
    return "9.0a" if (major, minor) == (9, 0) else f"{major}.{minor}"


def build(arch: str | None = None, verbose: bool = False):
    """Compile (or load the cached build of) the extension. arch: e.g. "9.0a"; default: the current device's."""
    global _ext
    if _ext is not None:
        return _ext
    from torch.utils.cpp_extension import load
    if arch is None:
        arch = arch_for(torch.cuda.get_device_capability())
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    try:
        _ext = load(name=f"diffusiongemma_kernels_{arch.replace('.', '')}", sources=[str(s) for s in SOURCES],
                    extra_cuda_cflags=["-O3", "-lineinfo"], extra_cflags=["-O3"], verbose=verbose)
    except Exception as e:  # the compiler's own message, whole
        raise KernelBuildError(f"building cuda_kernels for {arch} failed:\n{e}") from None
    return _ext


def compile_only(arch: str = "9.0a", out_dir: str | None = None) -> list[Path]:
    """Compile each .cu to an object file with nvcc (no GPU, no CUDA runtime needed): the check that
    the kernels build, for machines without a GPU. Returns the object files."""
    import subprocess
    import sysconfig
    import tempfile
    from torch.utils.cpp_extension import include_paths
    out = Path(out_dir or tempfile.mkdtemp(prefix="cuda_kernels_"))
    code = arch.replace(".", "")
    incs = [f"-I{p}" for p in include_paths("cuda")] + [f"-I{sysconfig.get_paths()['include']}"]
    objects = []
    for src in SOURCES:
        if src.suffix != ".cu":
            continue
        obj = out / (src.stem + ".o")
        cmd = ["nvcc", "-c", str(src), "-o", str(obj), "-std=c++20", "-O3", "--expt-relaxed-constexpr",
               f"-gencode=arch=compute_{code},code=sm_{code}", "-Xcompiler", "-fPIC",
               "-DTORCH_EXTENSION_NAME=diffusiongemma_kernels", "-DTORCH_API_INCLUDE_EXTENSION_H",
               "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
               "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", *incs]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise KernelBuildError(f"nvcc failed on {src.name} for sm_{code}:\n{p.stderr}")
        objects.append(obj)
    return objects


# ---- the fast paths, with the signatures of the plain ones ------------------------------------

FORMATS = {None: 0, "int8": 1, "int4": 2}  # fused_moe.cu's Format


def experts_forward(experts, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """moe.Experts.forward on the GPU, for bf16, int8 or int4 experts: x (T, D) bf16, idx (T, K),
    weights (T, K) fp32 -> (T, D) bf16.

    Sorting by expert happens here with torch ops that never wait for the host, so a CUDA graph can
    capture it."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    E, K = gate_up.shape[0], idx.shape[1]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offsets = F.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))  # (E + 1,)
    sorted_token = torch.div(order, K, rounding_mode="floor").int()
    sorted_weight = weights.reshape(-1)[order].float()
    none = torch.empty(0, device=x.device)
    q = experts.quant
    scales = [getattr(experts, n + "_scale", none) for n in ("gate_up_proj", "down_proj")]
    zeros = [getattr(experts, n + "_zero", none) for n in ("gate_up_proj", "down_proj")]
    group = 0 if q != "int4" else x.shape[1] // scales[0].shape[-1]
    I = gate_up.shape[1] // 2  # rows are never packed: int4 packs along the inputs
    return build().fused_moe(x.contiguous(), sorted_token, sorted_weight, offsets, gate_up, scales[0], zeros[0],
                             down, scales[1], zeros[1], FORMATS[q], group, I)


def canvas_attention(q, k_cache, v_cache, k_new, v_new, valid):
    """Canvas attention: q (B, H, C, d); caches (B, Hkv, Tc, d) or None; valid (B, Tc) bool or None."""
    if k_cache is None:
        k_cache = v_cache = k_new[:, :, :0]
    empty = torch.empty(0, dtype=torch.bool, device=q.device)
    return build().canvas_attention(q.contiguous(), k_cache.contiguous(), v_cache.contiguous(), k_new.contiguous(),
                                    v_new.contiguous(), empty if valid is None else valid)


# ---- choosing a path --------------------------------------------------------------------------

def choose(kind: str, device: torch.device) -> tuple[str, str]:
    """("cuda" | "torch", why). kind: "auto", "cuda" or "torch"."""
    if kind == "torch":
        return "torch", "asked for"
    if device.type != "cuda":
        if kind == "cuda":
            raise KernelBuildError(f"--kernels cuda needs a CUDA device (the model is on {device})")
        return "torch", f"no CUDA device ({device})"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        if kind == "cuda":
            raise KernelBuildError("--kernels cuda needs an sm_80 or newer GPU (bf16 tensor cores)")
        return "torch", "GPU older than sm_80"
    return "cuda", torch.cuda.get_device_name(device)


def use_kernels(model, kind: str = "auto") -> str:
    """Switch every layer of model to the CUDA kernels (or back to plain PyTorch); returns the
    one-line announcement. bf16 weights only: other dtypes stay on the plain path."""
    device = model.device
    path, why = choose(kind, device)
    if path == "cuda" and model.dtype != torch.bfloat16:
        if kind == "cuda":
            raise KernelBuildError("--kernels cuda needs bf16 weights (--dtype bfloat16)")
        path, why = "torch", f"weights are {model.dtype}, the kernels take bf16"
    if path == "cuda":
        c = model.config
        dims = [c.layer_head_dim(i) for i in range(c.num_hidden_layers)]
        if c.hidden_size % 64 or c.moe_intermediate_size % 64 or any(d % 16 or d > 512 for d in dims):
            if kind == "cuda":
                raise KernelBuildError("--kernels cuda needs hidden and expert sizes that are multiples of 64 "
                                       "and head_dim a multiple of 16 up to 512")
            path, why = "torch", "shapes the kernels do not take"
    if path == "cuda":
        build()
    for layer in model.layers:
        layer.experts.kernel = experts_forward if path == "cuda" else None
        layer.self_attn.canvas_kernel = canvas_attention if path == "cuda" else None
    return f"kernels: cuda ✓ ({why})" if path == "cuda" else f"kernels: torch ({why})"
