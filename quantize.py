"""Quantize a DiffusionGemma checkpoint directory (ours or Hugging Face's): int8 / int4 weights only.

Reads the source tensor by tensor, writes the quantized checkpoint (the formats and the config.json
`quantization` block are described in quant.py) into a temporary directory beside the destination
and renames it into place at the end, so an interrupted run leaves nothing half-written. Peak memory:
one source tensor, its quantized form, and the output shard being filled.

    python quantize.py weights-code /tmp/code-int4 --experts int4 --attention int8 --force
    python quantize.py --measure weights-code      # error of each int4 choice on the expert weights
"""

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch

from checkpoint import PREFIX, ShardWriter, staged_directory, weight_map
from hfconfig import CheckpointError, read_config, read_json
from quant import FORMAT, dequantize, quantize, rule_for
from terminal import Parser, positive


def convert(src: Path, dst: Path, block: dict, max_shard_bytes: int = 2 ** 30, force: bool = False) -> dict:
    """Quantize checkpoint src into dst. Returns {tensor name: relative error}."""
    from safetensors import safe_open
    read_config(src)  # a valid DiffusionGemma checkpoint
    cfg = read_json(src / "config.json")
    if "quantization" in cfg:
        raise CheckpointError(f"{src} is already quantized; quantize the original checkpoint")
    wmap = weight_map(src)
    if dst.exists() and not force:
        raise FileExistsError(dst)
    check_group_size(wmap, block)  # before anything is written
    errors = {}
    with staged_directory(dst, force) as tmp:
        shards = ShardWriter(tmp, max_shard_bytes)
        for file in sorted(set(wmap.values())):
            with safe_open(file, framework="pt") as f:
                for name in [n for n, fl in wmap.items() if fl == file]:
                    t = f.get_tensor(name)
                    short = name[len(PREFIX):] if name.startswith(PREFIX) else None
                    kind = rule_for(short, block) if short else None
                    if not kind:
                        shards.add(name, t)
                        continue
                    parts = quantize(t, kind, block.get("group_size", 64), block.get("zero_point", True))
                    back = dequantize(parts, kind, torch.float32)
                    errors[short] = ((back - t.float()).norm() / t.float().norm().clamp(min=1e-12)).item()
                    for suffix, v in parts.items():
                        shards.add(name + suffix, v)
        shards.close()
        cfg["quantization"] = {"format": FORMAT, **block}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for extra in src.iterdir():  # tokenizer, generation config, chat template, ...
            if extra.is_file() and extra.suffix != ".safetensors" and \
                    extra.name not in ("config.json", "model.safetensors.index.json"):
                shutil.copy(extra, tmp / extra.name)
    return errors


def check_group_size(wmap: dict, block: dict) -> None:
    """ValueError (one line) unless the int4 group size divides the input size of every tensor that
    becomes int4, read from the shards' headers."""
    from safetensors import safe_open
    g = block.get("group_size", 64)
    sizes = {}
    for name, file in wmap.items():
        short = name[len(PREFIX):] if name.startswith(PREFIX) else None
        if short and rule_for(short, block) == "int4":
            with safe_open(file, framework="pt") as f:
                sizes.setdefault(f.get_slice(name).get_shape()[-1], short)
    bad = {n: short for n, short in sizes.items() if n % g}
    if bad:
        n, short = min(bad.items())
        fits = [d for d in (16, 32, 64, 128, 256) if all(k % d == 0 for k in sizes)]
        raise ValueError(f"--group-size {g} does not divide the input size {n} of {short}: choose one that divides "
                         f"every int4 tensor's ({', '.join(map(str, fits)) or 'none of 16-256'})")


def measure(src: Path, groups=(16, 32, 64, 128)) -> list[tuple]:
    """Relative error of the int4 choices (and int8) on the checkpoint's expert weights."""
    from safetensors import safe_open
    wmap = weight_map(src)
    names = [n for n in wmap if n.startswith(PREFIX) and rule_for(n[len(PREFIX):], {"experts": "x"})][:8]
    tensors = []
    for n in names:
        with safe_open(wmap[n], framework="pt") as f:
            tensors.append(f.get_tensor(n).float())
    n_in = min(t.shape[-1] for t in tensors)
    rows = []
    for kind, g, zp in [("int8", 0, False)] + [("int4", g, zp) for g in groups if n_in % g == 0 for zp in (False, True)]:
        num = den = 0.0
        for t in tensors:
            back = dequantize(quantize(t, kind, g or 64, zp), kind, torch.float32)
            num += (back - t).pow(2).sum().item()
            den += t.pow(2).sum().item()
        bits = 8 + 16 / n_in if kind == "int8" else 4 + (16 + 8 * zp) / g
        rows.append((kind, g or "-", "yes" if zp else "no", math.sqrt(num / den), bits))
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The command line of quantize.py."""
    p = Parser(description="Quantize a DiffusionGemma checkpoint (weights only).",
               usage="%(prog)s SRC DST [options]  |  %(prog)s --measure SRC")
    p.add_argument("src", metavar="SRC", help="checkpoint directory (ours or Hugging Face's)")
    p.add_argument("dst", metavar="DST", nargs="?", help="where to write the quantized checkpoint: a new directory "
                   "(required, except with --measure)")
    p.add_argument("--experts", choices=["int8", "int4", "none"], default="int4", help="routed experts (default int4)")
    p.add_argument("--group-size", type=positive(int), default=64,
                   help="int4 group size along the input dim, dividing it (default 64)")
    p.add_argument("--symmetric", action="store_true", help="int4 without a zero point")
    p.add_argument("--attention", choices=["int8", "int4", "none"], default="int8",
                   help="attention projections (default int8)")
    p.add_argument("--mlp", choices=["int8", "int4", "none"], default="int8",
                   help="dense and self-conditioning MLPs (default int8)")
    p.add_argument("--embedding", choices=["int8", "none"], default="none", help="the tied embedding (default none)")
    p.add_argument("--measure", action="store_true", help="print the error of each int4/int8 choice and exit")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    return p


def main(args: argparse.Namespace) -> int:
    src = Path(args.src)
    if args.measure:
        print("| kind | group | zero point | relative error | bits per weight |\n|---|---|---|---|---|")
        for kind, g, zp, err, bits in measure(src):
            print(f"| {kind} | {g} | {zp} | {err:.4f} | {bits:.2f} |")
        return 0
    if not args.dst:
        print("error: give SRC_DIR and DST_DIR (or --measure SRC_DIR)", file=sys.stderr)
        return 2
    block = {"experts": args.experts, "group_size": args.group_size, "zero_point": not args.symmetric,
             "attention": args.attention, "mlp": args.mlp, "embedding": args.embedding}
    block = {k: (None if v == "none" else v) for k, v in block.items()}
    try:
        errors = convert(src, Path(args.dst), block, force=args.force)
    except FileExistsError:
        print(f"error: {args.dst} already exists: choose another destination, or --force to replace it",
              file=sys.stderr)
        return 2
    except ValueError as e:  # a group size that does not divide a tensor
        print(f"error: {e}", file=sys.stderr)
        return 2
    worst = max(errors.items(), key=lambda kv: kv[1]) if errors else ("-", 0.0)
    print(f"wrote {args.dst}: {len(errors)} tensors quantized, mean relative error "
          f"{sum(errors.values()) / max(len(errors), 1):.4f}, worst {worst[1]:.4f} ({worst[0]})")
    return 0


if __name__ == "__main__":
    args = build_parser().parse_args()
    try:
        sys.exit(main(args))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
