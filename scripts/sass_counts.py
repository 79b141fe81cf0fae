"""What the fused MoE compiles to, counted without a GPU: nvcc builds cuda_kernels/fused_moe.cu for
Hopper (sm_90a) as a cubin, cuobjdump disassembles it, and this counts per kernel

  - generic loads (LD): operands fetched through a generic pointer; the tensor-core fragments must
    come through ldmatrix (LDSM) from shared memory instead, so this is 0;
  - LDSM, HMMA, cp.async (LDGSTS), global loads (LDG), and the registers and spills ptxas reports;
  - the instructions a thread spends to turn 8 stored int8 or int4 weights into bf16 (the
    conversion alone, built into a probe kernel with -DFUSED_MOE_CONVERT_PROBE, counted between two
    of its 16-byte shared stores: one step of the unrolled loop). int4 must cost less than int8.

Needs nvcc and cuobjdump (the CUDA toolkit's, or the copy bundled with triton) and a CUDA build of
torch for the headers.

    python scripts/sass_counts.py --arch sm_90a --json /tmp/sass_counts.json
"""

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "cuda_kernels" / "fused_moe.cu"
INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def tool(name: str) -> str | None:
    """nvcc / cuobjdump: on PATH, in CUDA_HOME, or (cuobjdump) the one triton ships."""
    found = shutil.which(name)
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if not found and home and (Path(home) / "bin" / name).exists():
            found = str(Path(home) / "bin" / name)
    if not found and name == "cuobjdump":
        try:
            import triton
            bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
            found = str(bundled) if bundled.exists() else None
        except ImportError:
            pass
    return found


def compile_cubin(arch: str, out: Path) -> str:
    """nvcc -cubin with the probe; returns ptxas' report (registers, spills)."""
    import torch  # its headers; not torch.utils.cpp_extension, which fixes CUDA_HOME when imported
    top = Path(torch.__file__).parent / "include"
    includes = [f"-I{p}" for p in (top, top / "torch" / "csrc" / "api" / "include", sysconfig.get_paths()["include"])]
    cmd = [tool("nvcc"), "-cubin", f"-arch={arch}", "-O3", "-std=c++20", "--expt-relaxed-constexpr",
           "-DFUSED_MOE_CONVERT_PROBE", "-Xptxas", "-v", *includes, "-o", str(out), str(SOURCE)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"error: nvcc failed:\n{done.stderr[-3000:]}")
    return done.stderr


def short(mangled: str) -> str:
    """gate_up<INT4> from the mangled name (the template argument is the Format)."""
    name = re.search(r"(gate_up_kernel|down_kernel|convert_probe)ILi(\d)E", mangled)
    return f"{name[1].replace('_kernel', '')}<{('BF16', 'INT8', 'INT4')[int(name[2])]}>" if name else mangled


def per_eight(ops: list[str]) -> int:
    """Instructions from the first 16-byte shared store to the second: one step of the conversion."""
    stores = [i for i, op in enumerate(ops) if op == "STS.128"]
    return stores[1] - stores[0]


def counts(arch: str = "sm_90a") -> dict:
    """Per kernel: the instruction counts above, registers and spill bytes."""
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "fused_moe.cubin"
        report = compile_cubin(arch, cubin)
        sass = subprocess.run([tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    regs = {}
    for block in re.split(r"Compiling entry function", report)[1:]:
        name = short(block.split("'")[1])
        r, spill = re.search(r"Used (\d+) registers", block), re.search(r"(\d+) bytes spill stores", block)
        regs[name] = (int(r[1]) if r else 0, int(spill[1]) if spill else 0)
    out = {}
    for fn in re.split(r"\n\s*Function : ", sass)[1:]:
        name = short(fn.split("\n", 1)[0])
        ops = [op for op in INSTRUCTION.findall(fn) if op != "NOP"]
        kinds = collections.Counter(op.split(".")[0] for op in ops)
        row = {k: kinds.get(k, 0) for k in ("LD", "LDSM", "HMMA", "LDGSTS", "LDG")}
        row["registers"], row["spill_bytes"] = regs.get(name, (0, 0))
        if name.startswith("convert_probe"):
            row["per_8_weights"] = per_eight(ops)
        out[name] = row
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line of scripts/sass_counts.py."""
    p = argparse.ArgumentParser(description="Count what fused_moe.cu compiles to (no GPU needed).")
    p.add_argument("--arch", default="sm_90a", help="the GPU architecture to compile for (default sm_90a)")
    p.add_argument("--json", help="also write the counts here")
    return p


def main(args: argparse.Namespace) -> int:
    for name in ("nvcc", "cuobjdump"):
        if tool(name) is None:
            raise SystemExit(f"error: {name} not found: install the CUDA toolkit (or set CUDA_HOME)")
    c = counts(args.arch)
    cols = ["LD", "LDSM", "HMMA", "LDGSTS", "LDG", "registers", "spill_bytes", "per_8_weights"]
    print(f"{'kernel':18}" + "".join(f"{k:>15}" for k in cols))
    for name, row in c.items():
        print(f"{name:18}" + "".join(f"{row.get(k, '-'):>15}" for k in cols))
    if args.json:
        Path(args.json).write_text(json.dumps(c, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
