"""Hand-written CUDA kernels for the denoising step, and the one place where a model is switched to them.

  fused_moe.cu   the 128 experts as one grouped GEMM over tokens sorted by expert (cp.async pipeline)
  attention.cu   the canvas's bidirectional attention over [cached prefix ; canvas]
  sampler.cu     the sampler's pass over the logits, fused: scaled logits, argmax, entropy, a sample
  rmsnorm.cu     RMSNorm in one pass
  fused_ops.cu   the glue between them in single kernels: a layer's end (three norms, two adds, the
                 layer scalar), a head's q/k norm with its RoPE, the router's tail, the head's softcap
  bindings.cpp   their Python bindings

The kernels are built on first use with torch.utils.cpp_extension.load and cached (by default under
~/.cache/torch_extensions); Hopper gets sm_90a, other GPUs their own architecture.

How a model is switched to them (use_kernels, the one place): each module's class is swapped for a
subclass that overrides one method with the kernel, as distributed.py swaps the sharded modules:
RMSNorm -> FusedRMSNorm (forward), moe.Experts and its subclasses -> FusedExperts (forward),
moe.Router -> FusedRouter (forward),
Attention -> GQAAttention or KernelAttention (qkv and attend_canvas, attention.py's seams), model.Block
-> FusedBlock (combine), model.DiffusionGemma -> FusedHead (logits: model.py's seams). The weights stay
where they are, the plain classes come back with use_kernels(model, "torch"), and every kernel has
the signature of the plain function it replaces and is tested against it (test_kernels.py).

    from cuda_kernels import use_kernels; from generate import load
    model, _ = load("weights-code", device="cpu")
    print(use_kernels(model, "auto"))    # "kernels: cuda ✓ (NVIDIA H200 ...)" or "kernels: torch (no CUDA device (cpu))"

A failed build on a GPU machine is an error with the compiler's message, never a silent fallback.
"""

import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from attention import Attention, RMSNorm
from model import Block, DiffusionGemma
from moe import Experts, Router

HERE = Path(__file__).resolve().parent
SOURCES = [HERE / "bindings.cpp", HERE / "fused_moe.cu", HERE / "attention.cu", HERE / "sampler.cu", HERE / "rmsnorm.cu",
           HERE / "fused_ops.cu"]
_ext = None


class KernelBuildError(RuntimeError):
    """nvcc failed; the message carries its output."""


def arch_for(capability: tuple[int, int]) -> str:
    """TORCH_CUDA_ARCH_LIST entry: 9.0a (wgmma-capable Hopper) on sm_90, else the device's own."""
    major, minor = capability
    return "9.0a" if (major, minor) == (9, 0) else f"{major}.{minor}"


def cuda_home() -> str | None:
    """The CUDA toolkit that the nvcc on PATH belongs to, as nvcc itself reports it (an nvcc that is a
    wrapper script elsewhere would otherwise point torch's build at the wrong lib directory)."""
    import subprocess
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True,
                             text=True, timeout=30).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    top = next((ln.split("=", 1)[1].strip() for ln in dry.splitlines() if ln.startswith("#$ TOP=")), None)
    return os.path.realpath(top) if top else None


def build(arch: str | None = None, verbose: bool = False, build_directory: str | None = None):
    """Compile (or load the cached build of) the extension. arch: e.g. "9.0a"; default: the current
    device's. The one build recipe: compile_only uses it too."""
    global _ext
    if _ext is not None and build_directory is None:
        return _ext
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and cuda_home():
        os.environ["CUDA_HOME"] = cuda_home()  # before cpp_extension reads it: where libcudart is
        if "torch.utils.cpp_extension" in sys.modules:  # imported already: it read its guess at import
            sys.modules["torch.utils.cpp_extension"].CUDA_HOME = os.environ["CUDA_HOME"]
    from torch.utils.cpp_extension import load
    if arch is None:
        arch = arch_for(torch.cuda.get_device_capability())
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch  # read by cpp_extension for the -gencode flags
    try:
        ext = load(name=f"diffusiongemma_kernels_{arch.replace('.', '')}", sources=[str(s) for s in SOURCES],
                   extra_cuda_cflags=["-O3", "-lineinfo"], extra_cflags=["-O3"], verbose=verbose,
                   build_directory=build_directory)
    except Exception as e:  # the compiler's own message, whole
        raise KernelBuildError(f"building cuda_kernels for {arch} failed:\n{e}") from None
    finally:
        if old is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old
    if build_directory is None:
        _ext = ext
    return ext


def compile_only(arch: str = "9.0a", out_dir: str | None = None):
    """Build the extension for `arch` into out_dir without a GPU (nvcc and a CUDA build of torch are
    enough): the check that the kernels compile and link, on machines with no GPU."""
    import tempfile
    return build(arch, build_directory=str(out_dir or tempfile.mkdtemp(prefix="cuda_kernels_")))


# ---- the kernels, with the signatures of the plain functions -------------------------------------

FORMATS = {None: 0, "int8": 1, "int4": 2}  # fused_moe.cu's Format


def experts_forward(experts, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """moe.Experts.forward on the GPU, for bf16, int8 or int4 experts: x (T, D) bf16, idx (T, K),
    weights (T, K) fp32 -> (T, D) bf16.

    Sorting by expert happens here with torch ops that never wait for the host, so a CUDA graph can
    capture it. The kernel writes one fp32 row per assignment; the sum over the top-k slots is done
    here in slot order, so the result is the same bits every run (no atomics)."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    E, K = gate_up.shape[0], idx.shape[1]
    T = x.shape[0]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offsets = F.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))  # (E + 1,)
    sorted_token = torch.div(order, K, rounding_mode="floor").int()
    sorted_weight = weights.reshape(-1)[order].float()
    none = torch.empty(0, device=x.device)
    q = getattr(experts, "kind", None)  # quant.QuantExperts: "int8" / "int4"
    scales = [getattr(experts, n + "_scale", none) for n in ("gate_up_proj", "down_proj")]
    zeros = [getattr(experts, n + "_zero", none) for n in ("gate_up_proj", "down_proj")]
    group = 0 if q != "int4" else x.shape[1] // scales[0].shape[-1]
    I = gate_up.shape[1] // 2  # rows are never packed: int4 packs along the inputs
    out = build().fused_moe(x.contiguous(), sorted_token, order.int(), sorted_weight, offsets, gate_up, scales[0],
                            zeros[0], down, scales[1], zeros[1], FORMATS[q], group, I)  # (A, D) fp32
    return out.view(T, K, -1).sum(dim=1).to(x.dtype)  # the K slots in order, in fp32: as the plain path


def canvas_attention(q, k_cache, v_cache, k_new, v_new, valid):
    """attention.canvas_attention reading the cache in place: q (B, H, C, d); caches (B, Hkv, Tc, d)
    or None; valid (B, Tc) bool or None."""
    if k_cache is None:
        k_cache = v_cache = k_new[:, :, :0]
    empty = torch.empty(0, dtype=torch.bool, device=q.device)
    return build().canvas_attention(q.contiguous(), k_cache.contiguous(), v_cache.contiguous(), k_new.contiguous(),
                                    v_new.contiguous(), empty if valid is None else valid)


def gqa_canvas_attention(q, k_cache, v_cache, k_new, v_new, valid):
    """attention.canvas_attention without repeating K/V per query group: SDPA's grouped-query path
    with the mask (transformers repeats K/V whenever there is a mask; the two differ in rounding)."""
    k = k_new if k_cache is None else torch.cat([k_cache, k_new], dim=2)
    v = v_new if v_cache is None else torch.cat([v_cache, v_new], dim=2)
    mask = None if valid is None else F.pad(valid, (0, q.shape[2]), value=True)[:, None, None, :]  # (B, 1, 1, T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=q.shape[1] != k.shape[1])


def sampler_stats(raw: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor) -> tuple:
    """The sampler's pass over the logits and the renoise draw in one kernel: raw (B, C, V) fp32, the
    temperature (a device scalar) and one int64 key per row (B,) -> (sampled, argmax, entropy,
    noise) (B, C) and the scaled logits (B, C, V) in bf16, ordered as sampler.logit_stats returns
    them. Samples by Gumbel-max and draws the renoise tokens from a counter-based generator keyed by
    row: seeded, graph-safe, but another random stream than the plain path's multinomial."""
    B, C, V = raw.shape
    sc, argmax, sample, h, noise = build().sampler_stats(raw.reshape(B * C, V).contiguous(),
                                                         temperature.float().reshape(()), keys.reshape(B), C)
    return sample.view(B, C), argmax.view(B, C), h.view(B, C), sc.view(B, C, V), noise.view(B, C)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """attention.RMSNorm.forward on the GPU in one kernel: x (..., D) bf16, weight (D,) or None."""
    empty = torch.empty(0, dtype=x.dtype, device=x.device)
    return build().rms_norm(x.contiguous(), empty if weight is None else weight.to(x.dtype), eps)


def post_ffn(block, h: torch.Tensor, dense: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """model.Block.combine in one kernel: h, dense, routed (B, S, D) bf16 -> (B, S, D)."""
    n1, n2, n = block.post_feedforward_layernorm_1, block.post_feedforward_layernorm_2, block.post_feedforward_layernorm
    return build().post_ffn(h.contiguous(), dense.contiguous(), routed.contiguous(), n1.weight.to(h.dtype),
                            n2.weight.to(h.dtype), n.weight.to(h.dtype), block.layer_scalar.to(h.dtype), n.eps)


def norm_rope(x: torch.Tensor, norm: RMSNorm, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """attention.apply_rope(norm(x), cos, sin) in one kernel: x (B, S, heads, d) bf16, cos/sin (1, S, d)."""
    S, d = x.shape[1], x.shape[3]
    return build().qk_norm_rope(x.contiguous(), norm.weight.to(x.dtype), cos.reshape(S, d).to(x.dtype).contiguous(),
                                sin.reshape(S, d).to(x.dtype).contiguous(), norm.eps)


def fused_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """attention.Attention.qkv with each of q's and k's norm + RoPE in one kernel."""
    B, S, _ = x.shape
    q = norm_rope(self.q_proj(x).view(B, S, -1, self.head_dim), self.q_norm, cos, sin).transpose(1, 2)
    k_raw = self.k_proj(x).view(B, S, -1, self.head_dim)
    v = k_raw if self.v_proj is None else self.v_proj(x).view(B, S, -1, self.head_dim)
    k = norm_rope(k_raw, self.k_norm, cos, sin).transpose(1, 2)
    return q, k, self.v_norm(v).transpose(1, 2)


def route(router, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """moe.Router.forward with its tail (softmax, top-k, renormalisation, per-expert scale) in one
    kernel: h (T, D) bf16 -> weights (T, K) fp32, expert ids (T, K) int64."""
    if h.dtype != torch.bfloat16 or router.proj.out_features > 256 or router.top_k > 8:
        return Router.forward(router, h)  # what the kernel does not take
    logits = router.proj(router.normed(h))
    weights, idx = build().router_tail(logits.contiguous(), router.per_expert_scale.to(logits.dtype), router.top_k)
    return weights, idx


def softcap_logits(model, h: torch.Tensor) -> torch.Tensor:
    """model.DiffusionGemma.logits with the softcap in one pass: the head's bf16 output read once
    (the kernel takes 8 logits at a time; other counts take the plain path)."""
    if h.dtype != torch.bfloat16 or (h.numel() // h.shape[-1] * model.config.vocab_size) % 8:
        return DiffusionGemma.logits(model, h)
    return build().softcap(F.linear(h, model.embedding_matrix()).contiguous(), model.config.final_logit_softcapping)


# ---- the modules that use them ---------------------------------------------------------------

class FusedRMSNorm(RMSNorm):
    """attention.RMSNorm in one kernel (rmsnorm.cu)."""

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class FusedExperts(Experts):
    """moe.Experts (bf16, or quant.QuantExperts' int8/int4 buffers) as one grouped GEMM (fused_moe.cu)."""

    def forward(self, x, idx, weights):
        return experts_forward(self, x, idx, weights)


class GQAAttention(Attention):
    """The canvas attention on SDPA's grouped-query path (no K/V repeat); q/k norm + RoPE fused."""
    qkv = fused_qkv

    def attend_canvas(self, q, k_cache, v_cache, k_new, v_new, valid):
        return gqa_canvas_attention(q, k_cache, v_cache, k_new, v_new, valid)


class KernelAttention(Attention):
    """The canvas attention in the flash-style kernel that reads the cache in place (attention.cu);
    q/k norm + RoPE fused."""
    qkv = fused_qkv

    def attend_canvas(self, q, k_cache, v_cache, k_new, v_new, valid):
        return canvas_attention(q, k_cache, v_cache, k_new, v_new, valid)


class FusedRouter(Router):
    """moe.Router with the softmax, top-k and weights of its tail in one kernel (fused_ops.cu)."""

    def forward(self, h):
        return route(self, h)


class FusedBlock(Block):
    """model.Block with its end (norms, adds, layer scalar) in one kernel (fused_ops.cu)."""

    def combine(self, h, dense, routed):
        return post_ffn(self, h, dense, routed)


class FusedHead(DiffusionGemma):
    """model.DiffusionGemma with the softcap of its logits in one kernel (fused_ops.cu)."""

    def logits(self, h):
        return softcap_logits(self, h)


FAST = {RMSNorm: FusedRMSNorm, Experts: FusedExperts, Router: FusedRouter, Block: FusedBlock, DiffusionGemma: FusedHead}
_made: dict[tuple, type] = {}  # (plain class, fast base) -> the class with the fast method first


def fast_class(cls: type, base: type) -> type:
    """cls with base's method taking precedence: base itself for the plain class, else a subclass
    of both (quant.QuantExperts -> FusedQuantExperts; distributed.LocalExperts' forward calls on
    into FusedExperts.forward)."""
    plain = base.__mro__[1]
    if cls is plain or issubclass(cls, base):  # plain, or switched already
        return base if cls is plain else cls
    if (cls, base) not in _made:
        _made[(cls, base)] = type(base.__name__.replace(plain.__name__, "") + cls.__name__, (cls, base), {})
    return _made[(cls, base)]



# ---- choosing a path --------------------------------------------------------------------------

def choose(kind: str, device: torch.device) -> tuple[str, str]:
    """("cuda" | "torch", why). kind: "auto", "cuda" or "torch"."""
    if kind == "torch":
        return "torch", "asked for"
    if device.type != "cuda":
        if kind == "cuda":
            raise KernelBuildError(f"the CUDA kernels need a CUDA device (the model is on {device})")
        return "torch", f"no CUDA device ({device})"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        if kind == "cuda":
            raise KernelBuildError("the CUDA kernels need an sm_80 or newer GPU (bf16 tensor cores)")
        return "torch", "GPU older than sm_80"
    return "cuda", torch.cuda.get_device_name(device)


def shapes_fit(c) -> bool:
    """Sizes the kernels take: hidden and expert sizes multiples of 64 (hidden at most 8192: a layer's
    end is one block per row), head_dim a multiple of 16 up to 512, a vocabulary that is a multiple of
    4 (the sampler reads 4 logits at a time)."""
    dims = [c.layer_head_dim(i) for i in range(c.num_hidden_layers)]
    return not (c.hidden_size % 64 or c.hidden_size > 8192 or c.moe_intermediate_size % 64 or c.vocab_size % 4
                or any(d % 16 or d > 512 for d in dims))


def swap(root, attention_kernel: bool = False) -> None:
    """Every RMSNorm, experts module, attention block, layer and the model under root to its fast
    class (a model stays switched: there is no way back, build another for the plain path)."""
    attention = KernelAttention if attention_kernel else GQAAttention
    for module in root.modules():  # every norm: the layers', the final one, self-conditioning's
        if isinstance(module, Attention):
            module.__class__ = fast_class(type(module), attention)
        else:
            kind = next((k for k in FAST if isinstance(module, k)), None)
            if kind is not None:
                module.__class__ = fast_class(type(module), FAST[kind])


def use_kernels(model, kind: str = "auto", attention_kernel: bool = False) -> str:
    """Switch model to the CUDA kernels where they run (kind "cuda" or "auto"; "torch" leaves it
    plain); returns the one-line announcement. bf16 weights only: other dtypes stay on the plain path. The canvas attention runs
    on SDPA's grouped-query path unless attention_kernel (scripts/kernel_bench.py measures both)."""
    device = model.device
    path, why = choose(kind, device)
    if path == "cuda" and model.dtype != torch.bfloat16:
        if kind == "cuda":
            raise KernelBuildError(f"the CUDA kernels need bfloat16 weights, not {model.dtype}")
        path, why = "torch", f"weights are {model.dtype}, the kernels take bf16"
    if path == "cuda" and not shapes_fit(model.config):
        if kind == "cuda":
            raise KernelBuildError("the CUDA kernels need hidden and expert sizes that are multiples of 64, "
                                   "head_dim a multiple of 16 up to 512 and a vocabulary that is a multiple of 4")
        path, why = "torch", "shapes the kernels do not take"
    if path == "cuda":
        build()
    if path == "cuda":
        swap(model, attention_kernel)
    if path != "cuda":
        return f"kernels: torch ({why})"
    return (f"kernels: cuda ✓ ({why}; fused MoE, RMSNorm, norm + RoPE, router, layer end, softcap, sampler; "
            f"canvas attention: {'kernel' if attention_kernel else 'SDPA'})")
