"""fused_moe.cu's bit and index arithmetic followed on the CPU, without a GPU: the int8 and int4
conversions (bit patterns, the staged scale and zero words) against quant.py's reference bits, and
the tensor-core fragments (ldmatrix addresses, mma.sync m16n8k16 register layouts as the PTX ISA
defines them, the epilogue's stores) against a plain matrix product. The expressions followed here
are read from, or checked against, the source, so an edit there that is not followed here fails.
What the compiler makes of it is counted by scripts/sass_counts.py (test at the end)."""

import re
import shutil
import struct
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
SRC = (HERE / "cuda_kernels" / "fused_moe.cu").read_text()
BN = BK = 64
THREADS, LD = 128, BK + 8
SLOTS = BK // 8


def byte_perm(x: int, y: int, s: int) -> int:
    """CUDA's __byte_perm: result byte n is byte (s >> 4n) & 7 of the eight bytes of (x, y)."""
    b = x.to_bytes(4, "little") + y.to_bytes(4, "little")
    return int.from_bytes(bytes(b[(s >> (4 * n)) & 7] for n in range(4)), "little")


def test_int8_conversion_by_bit_patterns_is_exact():
    """int8 weights become bf16 pairs with two byte permutes and an add, no I2F: the constants, read
    from the source and followed on the CPU, give every int8 value exactly."""
    line = next(ln for ln in SRC.splitlines() if "__byte_perm(x, 0x4B000000u" in ln)
    spread, bias = int(re.search(r"0x4B000000u, (0x[0-9a-fA-F]+) \+ j", line)[1], 16), float(re.search(r"- ([0-9.]+)f", line)[1])
    pack = int(re.search(r"__float_as_uint\(f\[1\]\), (0x[0-9a-fA-F]+)\)", SRC)[1], 16)
    as_float = lambda u: struct.unpack("<f", struct.pack("<I", u))[0]  # noqa: E731
    as_bits = lambda f: struct.unpack("<I", struct.pack("<f", f))[0]  # noqa: E731
    values = list(range(-128, 128))
    for i in range(0, 256, 4):
        four = values[i: i + 4]
        x = int.from_bytes(bytes(v & 255 for v in four), "little") ^ 0x80808080
        f = [torch.tensor(as_float(byte_perm(x, 0x4B000000, spread + j))) - torch.tensor(bias) for j in range(4)]
        assert [v.item() for v in f] == four
        pairs = [byte_perm(as_bits(f[0].item()), as_bits(f[1].item()), pack), byte_perm(as_bits(f[2].item()), as_bits(f[3].item()), pack)]
        got = torch.tensor([(p >> (16 * h)) & 0xFFFF for p in pairs for h in (0, 1)], dtype=torch.int32).to(torch.int16)
        assert got.view(torch.bfloat16).float().tolist() == four


# ---- int4: the loader's staged words and the converter's bf16x2 arithmetic ---------------------------

def bf16_value(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0]


def bf16_round(v: float) -> int:
    """fp32 (exact here), then to bf16 rounding to nearest even: the .rn of the PTX instructions."""
    u = struct.unpack("<I", struct.pack("<f", v))[0]
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF


def fma_bf16x2(a: int, b: int, c: int) -> int:
    """fma.rn.bf16x2: each half a * b + c, rounded once (the operands here make float64 exact)."""
    halves = [bf16_round(bf16_value(a >> s) * bf16_value(b >> s) + bf16_value(c >> s)) for s in (0, 16)]
    return halves[0] | halves[1] << 16


def words_of(t: torch.Tensor) -> list[int]:
    """A tensor's bytes as the little-endian 32-bit words cp.async's 4-byte form copies."""
    b = bytes(t.contiguous().view(torch.uint8).flatten().tolist())
    b += bytes(-len(b) % 4)
    return [int.from_bytes(b[i: i + 4], "little") for i in range(0, len(b), 4)]


def emulated_int4_tile(packed, scale, zero, row0: int, k0: int, group: int) -> torch.Tensor:
    """issue_weights<INT4>'s staging and convert<INT4>, thread by thread: the bf16 bits of the
    (BN, BK) tile at (row0, k0)."""
    groups = scale.shape[-1]
    s_words, z_words = words_of(scale), words_of(zero)
    g0, span = k0 // group, (k0 + BK - 1) // group - k0 // group + 1
    words = [[[0] * BN for _ in range(SLOTS)] for _ in range(2)]
    for tid in range(THREADS):  # the loader
        r = tid % BN
        g_row = (row0 + r) * groups + g0
        for j in range(SLOTS * BN // THREADS):
            slot = tid // BN + j * (THREADS // BN)
            if slot < span:
                words[0][slot][r], words[1][slot][r] = s_words[(g_row + slot) >> 1], z_words[(g_row + slot) >> 2]
    raw = packed[row0: row0 + BN, k0 // 2: (k0 + BK) // 2].tolist()
    out = [[0] * BK for _ in range(BN)]
    for tid in range(THREADS):  # the converter
        r0, c = tid // (BK // 8), (tid % (BK // 8)) * 8
        gk = (k0 + c) // group
        slot = gk - g0
        at = (row0 + r0) * groups + gk
        s_sel, z_sel = 0x3232 if at & 1 else 0x1010, 0x4040 | (at & 3) * 0x0101
        for r in range(r0, BN, THREADS // (BK // 8)):
            s = byte_perm(words[0][slot][r], 0, s_sel)
            minus = byte_perm(words[1][slot][r], 0xC3C3C3C3, z_sel)
            q = int.from_bytes(bytes(raw[r][c // 2: c // 2 + 4]), "little")
            w = [fma_bf16x2(fma_bf16x2(((q >> (4 * j)) & 0x000F000F) | 0x43004300, 0x3F803F80, minus), s, 0x80008000)
                 for j in range(4)]
            pairs = [byte_perm(w[0], w[1], 0x5410), byte_perm(w[2], w[3], 0x5410),
                     byte_perm(w[0], w[1], 0x7632), byte_perm(w[2], w[3], 0x7632)]
            out[r][c: c + 8] = [(p >> (16 * h)) & 0xFFFF for p in pairs for h in (0, 1)]
    return torch.tensor(out, dtype=torch.int32).to(torch.int16)


def test_int4_emulation_follows_the_source():
    """The constants and expressions emulated_int4_tile follows are the source's."""
    for text in ("0x3232u : 0x1010u", "0x4040u | (at & 3) * 0x0101u", "__byte_perm(words[slot * BN + r], 0, s_sel)",
                 "0xC3C3C3C3u, z_sel", '"n"(0x000F000F), "n"(0x43004300)', "0xEA", "0x3F803F80u, minus), scale, 0x80008000u",
                 "__byte_perm(w[0], w[1], 0x5410), __byte_perm(w[2], w[3], 0x5410)",
                 "__byte_perm(w[0], w[1], 0x7632), __byte_perm(w[2], w[3], 0x7632)",
                 "(W.scale) + (g >> 1)", "(W.zero) + (g >> 2)", "slot = threadIdx.x / BN + j * (THREADS / BN)",
                 "g_row = (row0 + r) * W.groups + g0", "span = W.group_of(k0 + BK - 1) - g0 + 1",
                 "at = static_cast<uint32_t>((row0 + r0) * W.groups + gk)", "r = r0 + t * ROW_STEP"):
        assert text in SRC, text


@pytest.mark.parametrize("group,K", [(8, 128), (16, 128), (32, 128), (64, 192), (88, 704), (128, 256)])
def test_int4_conversion_gives_the_reference_bits(group, K):
    """Random nibbles, zero points and scales (every positive finite bf16 range, subnormals too): each
    tile the kernel converts has quant.dequantize_int4's bits, for groups smaller than a tile, equal
    to it, not dividing it (88) and larger; at row offsets that put the pairs at every word position."""
    from quant import dequantize_int4
    g = torch.Generator().manual_seed(group)
    rows = 2 * BN + 0
    packed = torch.randint(0, 256, (rows, K // 2), generator=g, dtype=torch.uint8)
    scale = torch.randint(1, 0x7C00, (rows, K // group), generator=g, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    zero = torch.randint(0, 16, (rows, K // group), generator=g, dtype=torch.uint8)
    ref = dequantize_int4(packed, scale, zero).view(torch.int16)
    for row0 in (0, BN):
        for k0 in range(0, K, BK):
            got = emulated_int4_tile(packed, scale, zero, row0, k0, group)
            assert torch.equal(got, ref[row0: row0 + BN, k0: k0 + BK]), (row0, k0)


# ---- the tensor-core fragments ------------------------------------------------------------------

def ldmatrix_x4(smem: torch.Tensor, addresses: list[int]) -> list[list[tuple]]:
    """ldmatrix .x4 (PTX ISA): lanes 8i..8i+7 give the row addresses of 8x8 matrix i; lane t
    receives, in register i, elements 2(t % 4) and +1 of that matrix's row t / 4."""
    flat = smem.flatten().tolist()
    return [[tuple(flat[addresses[8 * i + t // 4] + 2 * (t % 4) + e] for e in (0, 1)) for i in range(4)]
            for t in range(32)]


def mma_16816(acc: list[list[float]], a: list[list[tuple]], b0: list[tuple], b1: list[tuple]) -> None:
    """mma.sync m16n8k16 .row.col (PTX ISA fragment layouts): lane t, g = t / 4, c = t % 4 holds A rows
    g and g + 8 at k 2c, 2c + 1 (registers 0, 1) and k + 8 (2, 3); B at k 2c.. (b0) and 2c + 8.. (b1)
    of column g; C rows g (0, 1) and g + 8 (2, 3) at columns 2c, 2c + 1."""
    A, B = torch.zeros(16, 16, dtype=torch.float64), torch.zeros(16, 8, dtype=torch.float64)
    for t in range(32):
        g, c = t // 4, t % 4
        for reg, (row, k) in enumerate(((g, 0), (g + 8, 0), (g, 8), (g + 8, 8))):
            A[row, k + 2 * c: k + 2 * c + 2] = torch.tensor(a[t][reg], dtype=torch.float64)
        B[2 * c: 2 * c + 2, g] = torch.tensor(b0[t], dtype=torch.float64)
        B[2 * c + 8: 2 * c + 10, g] = torch.tensor(b1[t], dtype=torch.float64)
    D = A @ B
    for t in range(32):
        g, c = t // 4, t % 4
        acc[t] = [acc[t][0] + D[g, 2 * c].item(), acc[t][1] + D[g, 2 * c + 1].item(),
                  acc[t][2] + D[g + 8, 2 * c].item(), acc[t][3] + D[g + 8, 2 * c + 1].item()]


def test_fragment_addresses_and_layouts_give_the_product():
    """mainloop's ldmatrix addresses for A (rows) and W (the weight tile, rows = output columns) and
    store_acc's places, followed for all 4 warps and 4 row tiles over one BK step, give A . W^T."""
    for text in ("(warp * 16 + (lane / 16) * 8 + lane % 8) * LD + kk + ((lane / 8) % 2) * 8",
                 "(i * 16 + lane % 16) * LD + kk + (lane / 16) * 8", "mma_16816(acc[i][m][0], a, b[m][0], b[m][1])",
                 "mma_16816(acc[i][m][1], a, b[m][2], b[m][3])", "r = row0 + lane / 4, col = col0 + 2 * (lane % 4)",
                 "out + r * OUT_LD + col + 8 * n) = make_float2(c[n][0], c[n][1])",
                 "out + (r + 8) * OUT_LD + col + 8 * n) = make_float2(c[n][2], c[n][3])"):
        assert text in SRC, text
    g = torch.Generator().manual_seed(0)
    act = torch.randint(-8, 8, (BN, LD), generator=g).double()  # small integers: every sum exact
    wt = torch.randint(-8, 8, (BN, LD), generator=g).double()
    out = torch.zeros(BN, BN, dtype=torch.float64)
    for warp in range(THREADS // 32):
        acc = [[[[0.0] * 4 for _ in range(32)] for _ in range(2)] for _ in range(BN // 16)]
        for kk in range(0, BK, 16):
            b = ldmatrix_x4(wt, [(warp * 16 + (lane // 16) * 8 + lane % 8) * LD + kk + ((lane // 8) % 2) * 8
                                 for lane in range(32)])
            for i in range(BN // 16):
                a = ldmatrix_x4(act, [(i * 16 + lane % 16) * LD + kk + (lane // 16) * 8 for lane in range(32)])
                mma_16816(acc[i][0], a, [b[t][0] for t in range(32)], [b[t][1] for t in range(32)])
                mma_16816(acc[i][1], a, [b[t][2] for t in range(32)], [b[t][3] for t in range(32)])
        for i in range(BN // 16):  # store_acc(out, acc[i], i * 16, warp * 16)
            for lane in range(32):
                r, col = i * 16 + lane // 4, warp * 16 + 2 * (lane % 4)
                for n in range(2):
                    out[r, col + 8 * n: col + 8 * n + 2] = torch.tensor(acc[i][n][lane][:2])
                    out[r + 8, col + 8 * n: col + 8 * n + 2] = torch.tensor(acc[i][n][lane][2:])
    assert torch.equal(out, act[:, :BK] @ wt[:, :BK].T)


# ---- what the compiler makes of it ----------------------------------------------------------------

def can_count() -> bool:
    import sys
    sys.path.insert(0, str(HERE))
    from scripts.sass_counts import tool
    return torch.version.cuda is not None and shutil.which("nvcc") is not None and tool("cuobjdump") is not None


@pytest.mark.slow
@pytest.mark.skipif(not can_count(), reason="needs nvcc, cuobjdump and a CUDA build of torch")
def test_sass_counts():
    """Compiled for Hopper: no fragment through a generic load (ldmatrix instead), no spills, and int4
    spends fewer instructions than int8 to turn 8 stored weights into bf16."""
    from scripts.sass_counts import counts
    c = counts("sm_90a")
    moe = {k: v for k, v in c.items() if not k.startswith("convert_probe")}
    assert len(moe) == 6 and all(v["LD"] == 0 and v["LDSM"] > 0 and v["HMMA"] > 0 for v in moe.values()), moe
    assert all(v["spill_bytes"] == 0 for v in c.values()), c
    assert c["convert_probe<INT4>"]["per_8_weights"] < c["convert_probe<INT8>"]["per_8_weights"], c
