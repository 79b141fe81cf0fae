"""Quantized weights at run time: the int8 / int4 formats and the modules that hold them.

Formats, for a weight W of shape (..., out, in) that is multiplied as x @ W^T (in = the reduction dim):
  int8  q = round(W / s), s = max|W[row]| / 127 per output row       W ~ q * s           (symmetric)
  int4  per row and group of `group_size` inputs: s = (max - min) / 15, z = round(-min / s) in [0, 15],
        q = clamp(round(W / s) + z, 0, 15), two per byte (low nibble: even input index)
                                                                     W ~ (q - z) * s     (with a zero point)
        or symmetric (zero point fixed at 8): s = max|W| / 7, q = clamp(round(W / s) + 8, 0, 15)
In a checkpoint the weight keeps its name and holds q (int8, or uint8 with two int4 per byte); its
scales are stored as NAME_scale (bf16) and zero points as NAME_zero (uint8). config.json gets:

  "quantization": {"format": "diffusiongemma-weight-only", "experts": "int4", "group_size": 64,
                   "zero_point": true, "attention": "int8", "mlp": null, "embedding": null}

  experts    the routed experts (gate_up_proj, down_proj): 90% of the weights
  attention  q/k/v/o projections;  mlp  the dense MLP and the self-conditioning MLP
  embedding  the (tied) embedding, per-token int8
Norms, the router and layer scalars stay in bf16.

As in gpt-fast's quantize.py, quantization swaps modules rather than adding a flag to every layer:
convert_for_runtime replaces nn.Linear by QuantLinear, moe.Experts by QuantExperts and the embedding
by QuantEmbedding; the plain path dequantizes on the fly, the fused MoE kernel in its main loop.
quantize.py writes such checkpoints; checkpoint.load_model reads them.

    import torch; from quant import quantize_int4, dequantize_int4
    w = torch.randn(8, 64)
    packed, scale, zero = quantize_int4(w, group_size=32)    # (8, 32) uint8, (8, 2), (8, 2)
    back = dequantize_int4(packed, scale, zero, torch.float32)
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from model import DiffusionGemma
from moe import Experts

FORMAT = "diffusiongemma-weight-only"  # config.json's quantization.format (hfconfig.QUANT_FORMAT checks it)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., out, in) -> q int8 (..., out, in), scale (..., out) fp32."""
    wf = w.float()
    scale = wf.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = torch.round(wf / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """q * scale per output row, in dtype."""
    return (q.to(torch.float32) * scale.float()[..., None]).to(dtype)


def quantize_int4(w: torch.Tensor, group_size: int, zero_point: bool = True):
    """(..., out, in) -> packed uint8 (..., out, in/2), scale (..., out, in/g) fp32, zero (..., out, in/g) uint8."""
    *lead, n_in = w.shape
    if n_in % group_size or group_size % 2:
        raise ValueError(f"input size {n_in} is not a multiple of the int4 group size {group_size}")
    g = w.float().reshape(*lead, n_in // group_size, group_size)  # (..., out, groups, g)
    if zero_point:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)  # the range always holds 0
        scale = ((hi - lo) / 15.0).clamp(min=1e-12)
        zero = torch.round(-lo / scale).clamp(0, 15)
    else:
        scale = (g.abs().amax(-1) / 7.0).clamp(min=1e-12)
        zero = torch.full_like(scale, 8.0)
    q = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(0, 15).to(torch.uint8)
    q = q.reshape(*lead, n_in)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)  # (..., out, in/2)
    return packed, scale, zero.to(torch.uint8)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype=torch.bfloat16):
    """(q - zero) * scale per row and group, unpacked from two nibbles a byte, in dtype."""
    *lead, half = packed.shape
    q = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(*lead, 2 * half).float()  # (..., out, in)
    groups = scale.shape[-1]
    q = q.reshape(*lead, groups, -1)
    w = (q - zero.float()[..., None]) * scale.float()[..., None]
    return w.reshape(*lead, 2 * half).to(dtype)


def quantize(w: torch.Tensor, kind: str, group_size: int, zero_point: bool) -> dict[str, torch.Tensor]:
    """The tensors stored for one weight: {"": q, "_scale": ..., "_zero": ...}."""
    if kind == "int8":
        q, s = quantize_int8(w)
        return {"": q, "_scale": s.to(torch.bfloat16)}
    q, s, z = quantize_int4(w, group_size, zero_point)
    return {"": q, "_scale": s.to(torch.bfloat16), "_zero": z}


def dequantize(parts: dict, kind: str, dtype) -> torch.Tensor:
    """The weight back from its stored parts (quantize's output)."""
    if kind == "int8":
        return dequantize_int8(parts[""], parts["_scale"], dtype)
    return dequantize_int4(parts[""], parts["_scale"], parts["_zero"], dtype)


# ---------------------------------------------------------------------------------------------
# Which tensors, and the modules that hold them
# ---------------------------------------------------------------------------------------------

def rule_for(name: str, block: dict) -> str | None:
    """The quantization kind of a checkpoint tensor name (without the model.decoder. prefix), or None."""
    if name.startswith("layers.") and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return block.get("experts")
    if ".self_attn." in name and name.endswith("_proj.weight"):
        return block.get("attention")
    if (".mlp." in name or name.startswith("self_conditioning.")) and name.endswith("_proj.weight"):
        return block.get("mlp")
    if name == "embed_tokens.weight":
        return block.get("embedding")
    return None


def register_quantized(module: nn.Module, name: str, shape: tuple, kind: str, group_size: int) -> None:
    """Empty buffers for a quantized weight of `shape` under the checkpoint's names: NAME, NAME_scale, NAME_zero."""
    *lead, n_out, n_in = shape
    if kind == "int8":
        module.register_buffer(name, torch.empty(*lead, n_out, n_in, dtype=torch.int8))
        module.register_buffer(name + "_scale", torch.empty(*lead, n_out, dtype=torch.bfloat16))
    else:
        module.register_buffer(name, torch.empty(*lead, n_out, n_in // 2, dtype=torch.uint8))
        module.register_buffer(name + "_scale", torch.empty(*lead, n_out, n_in // group_size, dtype=torch.bfloat16))
        module.register_buffer(name + "_zero", torch.empty(*lead, n_out, n_in // group_size, dtype=torch.uint8))


def dequantize_buffers(module: nn.Module, name: str, kind: str, dtype, index=None) -> torch.Tensor:
    """The weight NAME of module, dequantized (only slice `index` of its leading dim, if given)."""
    suffixes = ("", "_scale") if kind == "int8" else ("", "_scale", "_zero")
    parts = {s: getattr(module, name + s) for s in suffixes}
    if index is not None:
        parts = {s: t[index] for s, t in parts.items()}
    return dequantize(parts, kind, dtype)


class QuantLinear(nn.Module):
    """nn.Linear (no bias) over a quantized weight; the plain path dequantizes on every call."""

    def __init__(self, linear: nn.Linear, kind: str, group_size: int):
        super().__init__()
        self.kind = kind
        register_quantized(self, "weight", tuple(linear.weight.shape), kind, group_size)

    def forward(self, x):
        return F.linear(x, dequantize_buffers(self, "weight", self.kind, x.dtype))


class QuantEmbedding(nn.Module):
    """Per-token int8 embedding; lookups dequantize rows, the tied head dequantizes the matrix."""

    def __init__(self, num_embeddings: int, dim: int, dtype):
        super().__init__()
        self.register_buffer("weight", torch.empty(num_embeddings, dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(num_embeddings, dtype=torch.bfloat16))
        self.dtype = dtype

    def forward(self, ids):
        return (F.embedding(ids, self.weight).float() * self.weight_scale[ids].float()[..., None]).to(self.dtype)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.weight, self.weight_scale, self.dtype)


class QuantExperts(Experts):
    """moe.Experts over quantized stacks (same checkpoint names); the plain path dequantizes one
    expert at a time, the fused MoE kernel reads `kind` and the _scale / _zero buffers."""

    def __init__(self, experts: Experts, kind: str, group_size: int):
        nn.Module.__init__(self)
        self.num_experts, self.kernel, self.kind = experts.num_experts, None, kind
        for name in ("gate_up_proj", "down_proj"):
            register_quantized(self, name, tuple(getattr(experts, name).shape), kind, group_size)

    def expert_weights(self, e: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return (dequantize_buffers(self, "gate_up_proj", self.kind, dtype, e),
                dequantize_buffers(self, "down_proj", self.kind, dtype, e))


def convert_for_runtime(net: DiffusionGemma, block: dict) -> None:
    """Swap the modules that the quantization block covers for their quantized versions (on meta)."""
    group = block.get("group_size", 64)
    for mod_name, mod in list(net.named_modules()):
        for child_name, child in list(mod.named_children()):
            full = f"{mod_name}.{child_name}" if mod_name else child_name
            if isinstance(child, nn.Linear) and rule_for(full + ".weight", block):
                setattr(mod, child_name, QuantLinear(child, rule_for(full + ".weight", block), group))
            elif isinstance(child, Experts) and rule_for(full + ".gate_up_proj", block):
                setattr(mod, child_name, QuantExperts(child, rule_for(full + ".gate_up_proj", block), group))
            elif isinstance(child, nn.Embedding) and rule_for(full + ".weight", block):
                setattr(mod, child_name, QuantEmbedding(child.num_embeddings, child.embedding_dim, net.dtype))


def quantize_in_slices(w: torch.Tensor, kind: str, group_size: int, zero_point: bool, experts: int = 16) -> dict:
    """quantize(w, ...) of a stack of experts (E, out, in) `experts` at a time: the same bits (scales
    and zero points are per row), but the fp32 temporaries of one slice instead of the whole stack
    (6 GB for a released (128, 1408, 2816) stack, 0.76 GB for 16 of it)."""
    if w.ndim < 3 or w.shape[0] <= experts:
        return quantize(w, kind, group_size, zero_point)
    parts = [quantize(w[i: i + experts], kind, group_size, zero_point) for i in range(0, w.shape[0], experts)]
    return {suffix: torch.cat([p[suffix] for p in parts]) for suffix in parts[0]}


def quantized_copy(net: DiffusionGemma, block: dict, free_source: bool = False) -> DiffusionGemma:
    """A quantized model built from an in-memory one, tensor by tensor, on the same device. Tensors
    that stay unquantized are shared, not copied. free_source: drop each source tensor once used, so
    only one bf16 tensor is ever held beside the quantized model."""
    config = dataclasses.replace(net.config, quantization={"format": FORMAT, **block})
    with torch.device("meta"):
        out = DiffusionGemma(config).to(net.dtype)
        convert_for_runtime(out, block)
    src = dict(net.state_dict())
    state, wanted = {}, out.state_dict()
    for name in list(src):
        kind = rule_for(name, block)
        if kind:
            parts = quantize_in_slices(src[name], kind, block.get("group_size", 64), block.get("zero_point", True))
            state.update({name + suffix: v for suffix, v in parts.items()})
            if free_source:
                src[name] = None
                owner, attr = net.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
                if attr in owner._buffers:
                    owner._buffers[attr] = None
                else:
                    owner._parameters[attr] = None
        elif name in wanted:
            state[name] = src[name]
    out.load_state_dict(state, assign=True, strict=True)
    return out.eval().requires_grad_(False)
