"""Weight-only quantization of DiffusionGemma: int8 per output channel, int4 group-wise.

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
Norms, the router and layer scalars stay in bf16. The loader (model.load_model) sees the block and
swaps in the quantized modules below before loading; the plain path dequantizes on the fly.

    python quantize.py SRC_DIR DST_DIR --experts int4 --attention int8
    python quantize.py --measure SRC_DIR           # error of each int4 choice on the expert weights
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "diffusiongemma-weight-only"


# ---------------------------------------------------------------------------------------------
# Quantize / dequantize
# ---------------------------------------------------------------------------------------------

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., out, in) -> q int8 (..., out, in), scale (..., out) fp32."""
    wf = w.float()
    scale = wf.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = torch.round(wf / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
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
    if kind == "int8":
        return dequantize_int8(parts[""], parts["_scale"], dtype)
    return dequantize_int4(parts[""], parts["_scale"], parts["_zero"], dtype)


# ---------------------------------------------------------------------------------------------
# Which tensors, and the modules that use them
# ---------------------------------------------------------------------------------------------

def rule_for(name: str, q: dict) -> str | None:
    """The quantization kind of a checkpoint tensor name (without the model.decoder. prefix), or None."""
    if name.startswith("layers.") and (name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj")):
        return q.get("experts")
    if ".self_attn." in name and name.endswith("_proj.weight"):
        return q.get("attention")
    if (".mlp." in name or name.startswith("self_conditioning.")) and name.endswith("_proj.weight"):
        return q.get("mlp")
    if name == "embed_tokens.weight":
        return q.get("embedding")
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


def convert_for_runtime(net, q: dict) -> None:
    """Swap the modules that the quantization block covers for their quantized versions (on meta)."""
    from moe import Experts
    dtype = net.dtype
    group = q.get("group_size", 64)
    for mod_name, mod in list(net.named_modules()):
        for child_name, child in list(mod.named_children()):
            full = f"{mod_name}.{child_name}" if mod_name else child_name
            if isinstance(child, nn.Linear):
                kind = rule_for(full + ".weight", q)
                if kind:
                    setattr(mod, child_name, QuantLinear(child, kind, group))
            elif isinstance(child, Experts):
                kind = rule_for(full + ".gate_up_proj", q)
                if kind:
                    child.quantize_(kind, group)
            elif isinstance(child, nn.Embedding) and rule_for(full + ".weight", q):
                setattr(mod, child_name, QuantEmbedding(child.num_embeddings, child.embedding_dim, dtype))


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


def quantized_copy(net, q: dict, free_source: bool = False):
    """A quantized model built from an in-memory one, tensor by tensor, on the same device. Tensors
    that stay unquantized are shared, not copied. free_source: drop each source tensor once used, so
    only one bf16 tensor is ever held beside the quantized model."""
    from model import DiffusionGemma
    with torch.device("meta"):
        out = DiffusionGemma(net.config).to(net.dtype)
        convert_for_runtime(out, q)
    src = dict(net.state_dict())
    state = {}
    wanted = out.state_dict()
    for name in list(src):
        kind = rule_for(name, q)
        if kind:
            parts = quantize(src[name], kind, q.get("group_size", 64), q.get("zero_point", True))
            state.update({name + suffix: v for suffix, v in parts.items()})
        elif name in wanted:
            state[name] = src[name]
        if free_source and kind:
            src[name] = None
            owner, attr = net.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
            setattr(owner, attr, None) if attr in owner._buffers else owner._parameters.__setitem__(attr, None)
    out.load_state_dict(state, assign=True, strict=True)
    out.config.quantization = {"format": FORMAT, **q}
    out.inv_freq = dict(net.inv_freq)
    return out.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Converting a checkpoint directory
# ---------------------------------------------------------------------------------------------

def convert(src: Path, dst: Path, q: dict, max_shard_bytes: int = 2 ** 30) -> dict:
    """Quantize a checkpoint directory tensor by tensor. Peak memory: one input tensor, its quantized
    form, and the output shard being filled (max_shard_bytes). Returns {name: relative error}."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from model import PREFIX, read_config, weight_map

    read_config(src)  # a valid DiffusionGemma checkpoint
    cfg = json.loads((src / "config.json").read_text())
    if "quantization" in cfg:
        raise SystemExit(f"error: {src} is already quantized")
    wmap = weight_map(src)
    tmp = Path(tempfile.mkdtemp(prefix=".quantizing-", dir=dst.parent if dst.parent.exists() else None))
    shard, size, n_shard, index, errors = {}, 0, 0, {}, {}

    def flush():
        nonlocal shard, size, n_shard
        if shard:
            n_shard += 1
            fname = f"model-{n_shard:05d}.safetensors"
            save_file(shard, tmp / fname, metadata={"format": "pt"})
            index.update({k: fname for k in shard})
            shard, size = {}, 0

    try:
        for file in sorted(set(wmap.values())):
            with safe_open(file, framework="pt") as f:
                for name in [n for n, fl in wmap.items() if fl == file]:
                    t = f.get_tensor(name)
                    short = name[len(PREFIX):] if name.startswith(PREFIX) else None
                    kind = rule_for(short, q) if short else None
                    if kind:
                        parts = quantize(t, kind, q.get("group_size", 64), q.get("zero_point", True))
                        back = dequantize(parts, kind, torch.float32)
                        errors[short] = ((back - t.float()).norm() / t.float().norm().clamp(min=1e-12)).item()
                        out = {name + suffix: v.contiguous() for suffix, v in parts.items()}
                    else:
                        out = {name: t.contiguous()}
                    for k, v in out.items():
                        shard[k] = v
                        size += v.numel() * v.element_size()
                    if size >= max_shard_bytes:
                        flush()
        flush()
        total = sum((tmp / f).stat().st_size for f in set(index.values()))
        renamed = {}
        for j, fname in enumerate(sorted(set(index.values()))):
            new = f"model-{j + 1:05d}-of-{n_shard:05d}.safetensors"
            os.replace(tmp / fname, tmp / new)
            renamed[fname] = new
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in index.items()}}, indent=2))
        cfg["quantization"] = {"format": FORMAT, **q}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for extra in src.iterdir():
            if extra.suffix != ".safetensors" and extra.name not in ("config.json", "model.safetensors.index.json") \
                    and extra.is_file():
                shutil.copy(extra, tmp / extra.name)
        dst.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, dst / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return errors


def safe_shape(file: Path, name: str) -> list[int]:
    from safetensors import safe_open
    with safe_open(file, framework="pt") as f:
        return f.get_slice(name).get_shape()


def measure(src: Path, groups=(16, 32, 64, 128)) -> list[tuple]:
    """Relative error of the int4 choices (and int8) on the checkpoint's expert weights."""
    from safetensors import safe_open
    from model import PREFIX, weight_map
    wmap = weight_map(src)
    names = [n for n in wmap if n.startswith(PREFIX) and rule_for(n[len(PREFIX):], {"experts": "x"})][:8]
    rows = []
    n_in = min(wmap_shape[-1] for wmap_shape in (safe_shape(wmap[n], n) for n in names))
    groups = [g for g in groups if n_in % g == 0]
    for kind, g, zp in [("int8", 0, False)] + [("int4", g, zp) for g in groups for zp in (False, True)]:
        num = den = 0.0
        for n in names:
            with safe_open(wmap[n], framework="pt") as f:
                t = f.get_tensor(n).float()
            back = dequantize(quantize(t, kind, g or 64, zp), kind, torch.float32)
            num += (back - t).pow(2).sum().item()
            den += t.pow(2).sum().item()
        bits = 8 + 16 / t.shape[-1] if kind == "int8" else 4 + (16 + 8 * zp) / g
        rows.append((kind, g or "-", "yes" if zp else "no", math.sqrt(num / den), bits))
    return rows


def main(a) -> int:
    from model import CheckpointError
    try:
        src = Path(a.src)
        if a.measure:
            print("| kind | group | zero point | relative error | bits per weight |\n|---|---|---|---|---|")
            for kind, g, zp, err, bits in measure(src):
                print(f"| {kind} | {g} | {zp} | {err:.4f} | {bits:.2f} |")
            return 0
        if not a.dst:
            print("error: give SRC_DIR and DST_DIR (or --measure SRC_DIR)", file=sys.stderr)
            return 2
        q = {"experts": a.experts, "group_size": a.group_size, "zero_point": not a.symmetric,
             "attention": a.attention, "mlp": a.mlp, "embedding": a.embedding}
        q = {k: (None if v == "none" else v) for k, v in q.items()}
        errors = convert(src, Path(a.dst), q)
        worst = max(errors.items(), key=lambda kv: kv[1]) if errors else ("-", 0.0)
        print(f"wrote {a.dst}: {len(errors)} tensors quantized, mean relative error "
              f"{sum(errors.values()) / max(len(errors), 1):.4f}, worst {worst[1]:.4f} ({worst[0]})")
        return 0
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Quantize a DiffusionGemma checkpoint (weights only).")
    p.add_argument("src", help="checkpoint directory (ours or Hugging Face's)")
    p.add_argument("dst", nargs="?", help="where to write the quantized checkpoint")
    p.add_argument("--experts", choices=["int8", "int4", "none"], default="int4", help="routed experts (default int4)")
    p.add_argument("--group-size", type=int, default=64, help="int4 group size along the input dim (default 64)")
    p.add_argument("--symmetric", action="store_true", help="int4 without a zero point")
    p.add_argument("--attention", choices=["int8", "int4", "none"], default="int8", help="attention projections")
    p.add_argument("--mlp", choices=["int8", "int4", "none"], default="int8", help="dense and self-conditioning MLPs")
    p.add_argument("--embedding", choices=["int8", "none"], default="none", help="the tied embedding")
    p.add_argument("--measure", action="store_true", help="print the error of each int4/int8 choice and exit")
    sys.exit(main(p.parse_args()))
