// Fused mixture-of-experts for the denoising canvas: a grouped GEMM that streams every expert's
// weights once per step, with enough loads in flight to run at memory bandwidth.
//
// Build: JIT-compiled by cuda_kernels/__init__.py with torch.utils.cpp_extension.load
// (sm_90a on Hopper, the device's own arch elsewhere; needs sm_80+ for cp.async and bf16 MMA).
//
// Math (the reference is moe.Experts.forward, the plain PyTorch path):
//   for every (token t, slot s) with expert e = idx[t, s] and routing weight w = weights[t, s]:
//     h      = gelu_tanh(x_t @ gate_e^T) * (x_t @ up_e^T)      gate_e / up_e = gate_up[e, :I] / [e, I:]
//     out_a  = w * (h @ down_e^T)                              one fp32 row per assignment a = t*K + s
//   y_t = sum over s of out_{t*K+s}, in slot order, in fp32 (done by the caller: out.view(T, K, D).sum(1)).
// Rounding follows the reference: gate, up, gelu(gate), h and the down output are rounded to bf16
// where the plain path's bf16 tensors are; only the accumulation order inside a dot product differs.
// No atomics: every output element is written once, so the same input gives the same bits.
//
// Why it is built this way: at the canvas's 256 tokens x top-8 every expert of every layer gets
// about 16 rows, so each weight byte is used ~16 times: the step is bound by the weight stream
// (16 FLOP/byte in bf16). A block must keep many bytes in flight. So:
//   - the weight tiles (and the activation rows) move with cp.async into a 3-stage ring, issued
//     STAGES-1 tiles ahead: a thread never waits for one load before issuing the next;
//   - every loop bound is a compile-time constant (THREADS, BM, BN, BK), so the loaders unroll;
//   - int8 and int4 weights travel as they are stored (1/2 and 1/4 of the bytes) and are turned
//     into bf16 in shared memory, 8 or 16 weights per thread with one scale (and zero) per group,
//     by bit patterns rather than int-to-float instructions (see convert), so the bytes saved can
//     become time saved.
//
// Layout of the work:
//   0. (host side, torch ops, no synchronisation) assignments a = t*K + s are sorted by expert;
//      offsets[e] .. offsets[e+1] are expert e's rows of the sorted list.
//   1. gate_up_kernel: grid (I / BN, E). A block owns BN columns of one expert's gate AND up
//      projections and walks the expert's rows in chunks of BM (one chunk unless an expert drew
//      more than 64 rows); for each chunk it streams the two weight tiles along D in steps of BK.
//      Epilogue: gelu_tanh(gate) * up, written to h (sorted order, bf16).
//   2. down_kernel: grid (D / BN, E). The same walk over h @ down_e^T along I; the epilogue
//      multiplies by the fp32 routing weight and writes the assignment's row at its original index.
//   Tensor cores through mma.sync m16n8k16 (bf16 in, fp32 accumulators), fed by ldmatrix from the
//   shared tiles: 4 warps, each owns 16 output columns and the BM rows (row tiles past the expert's
//   count are skipped).
//   Grid: (704/64) * 128 = 1408 and (2816/64) * 128 = 5632 blocks at the released shape.
//
// Weights in three formats (quant.py), a template parameter of both kernels:
//   BF16  as stored in the checkpoint;
//   INT8  int8 per output row with a bf16 scale per row: converted exactly to bf16 in shared memory,
//         the row's fp32 sum multiplied by its scale in the epilogue (it factors out of the sum);
//   INT4  two per byte (low nibble first) with a bf16 scale and a uint8 zero point per row and group
//         of `group` inputs: (q - zero) * scale in fp32, rounded to bf16 (as quant.dequantize_int4).
// Only the weight tile's loader and converter, and the epilogue's row scale, differ between them.

// Only the ATen headers it needs (not torch/extension.h): a quarter of the compile time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>

namespace {

constexpr int BM = 64;              // rows (token assignments) per chunk
constexpr int BN = 64;              // output columns per block
constexpr int BK = 64;              // reduction step: one tile of the ring
constexpr int STAGES = 3;           // tiles in flight: STAGES-1 ahead of the one being used
constexpr int WARPS = 4;            // each warp owns 16 output columns and all BM rows
constexpr int THREADS = 32 * WARPS;
constexpr int LD = BK + 8;          // bf16 tile row stride (elements): 144 bytes, 16-byte aligned, no bank conflicts
constexpr int OUT_LD = BN + 4;      // fp32 epilogue tile row stride

enum Format { BF16 = 0, INT8 = 1, INT4 = 2 };

constexpr int SLOTS = BK / 8;       // int4: the groups one tile row can span (a group is at least 8 inputs)

// Bytes of one weight row within one BK tile as stored, and the number of 16-byte chunks; int4
// stages after the BN rows the 32-bit words that hold each row's scales and zero points for the
// tile ([2][SLOTS][BN] words: scales, then zeros).
template <int FMT> struct Stored {
  static constexpr int bytes = FMT == BF16 ? BK * 2 : FMT == INT8 ? BK : BK / 2;
  static constexpr int chunks = bytes / 16;
  static constexpr int params = FMT == INT4 ? 2 * SLOTS * BN * 4 : 0;
};

__device__ __forceinline__ float bf16_round(float x) { return __bfloat162float(__float2bfloat16(x)); }

__device__ __forceinline__ float gelu_tanh(float x) {
  // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as F.gelu(approximate="tanh")
  const float k0 = 0.7978845608028654f, k1 = 0.044715f;
  return 0.5f * x * (1.f + tanhf(k0 * (x + k1 * x * x * x)));
}

// cp.async: a 16-byte copy global -> shared that the thread does not wait for; with pred false
// the 16 bytes are zero-filled and nothing is read.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(n));
}
// the 4-byte form (cp.async.ca): an int4 row's scale and zero point, in the aligned word that holds them
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(gmem));
}
// The tensor cores, by hand: ldmatrix moves 8x8 bf16 blocks from shared memory straight into the
// registers mma.sync m16n8k16 wants (one instruction for four blocks).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const __nv_bfloat16* smem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
// c += a (16x16, row-major) . b (16x8, column-major), fp32 accumulators
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// A warp's accumulators for one 16-row tile and its 16 columns: two m16n8 halves, 4 floats a lane.
using Acc = float[2][4];
// Lane l holds rows l/4 and l/4 + 8, columns 2(l%4) and +1 of each half: written to a row-major
// fp32 tile (row stride OUT_LD) at (row0, col0).
__device__ __forceinline__ void store_acc(float* out, const Acc& c, int row0, int col0) {
  const int lane = threadIdx.x % 32, r = row0 + lane / 4, col = col0 + 2 * (lane % 4);
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    *reinterpret_cast<float2*>(out + r * OUT_LD + col + 8 * n) = make_float2(c[n][0], c[n][1]);
    *reinterpret_cast<float2*>(out + (r + 8) * OUT_LD + col + 8 * n) = make_float2(c[n][2], c[n][3]);
  }
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// One weight matrix in any format. Row r holds input k at: bf16/int8 w[r * K + k], int4 byte
// w[r * K/2 + k/2] (nibble k % 2); int4 scale/zero at [r * K/group + k/group]; int8 scale at [r].
struct Weights {
  const void* w;
  const __nv_bfloat16* scale;
  const uint8_t* zero;
  int64_t K;
  int group;
  int64_t groups;   // K / group: (scale, zero) pairs per row
  int group_shift;  // log2(group) for a power of two (a shift, not a division), else -1
  __device__ __forceinline__ int group_of(int k) const { return group_shift >= 0 ? k >> group_shift : k / group; }
};

// Stage loader for BM activation rows (bf16, row stride ld elements, rows >= valid zero).
__device__ __forceinline__ void issue_rows(__nv_bfloat16* dst, const __nv_bfloat16* src, const int* row_index,
                                           int valid, int64_t ld, int k0) {
#pragma unroll
  for (int j = 0; j < BM * (BK / 8) / THREADS; ++j) {
    const int i = threadIdx.x + j * THREADS, r = i / (BK / 8), c = (i % (BK / 8)) * 8;
    const bool ok = r < valid;
    const __nv_bfloat16* g = ok ? src + (int64_t)row_index[r] * ld + k0 + c : src;
    cp_async16(dst + r * LD + c, g, ok);
  }
}

// Stage loader for BN weight rows from row0, inputs k0..k0+BK, as stored (bf16 straight into the
// bf16 tile; int8/int4 raw bytes into the stage's raw buffer).
template <int FMT>
__device__ __forceinline__ void issue_weights(unsigned char* dst, const Weights& W, int64_t row0, int k0) {
  constexpr int CH = Stored<FMT>::chunks;
  const int64_t row_bytes = FMT == BF16 ? W.K * 2 : FMT == INT8 ? W.K : W.K / 2;
  const int64_t k_bytes = FMT == BF16 ? (int64_t)k0 * 2 : FMT == INT8 ? k0 : k0 / 2;
  const unsigned char* base = static_cast<const unsigned char*>(W.w);
#pragma unroll
  for (int j = 0; j < (BN * CH + THREADS - 1) / THREADS; ++j) {
    const int i = threadIdx.x + j * THREADS;
    if (BN * CH % THREADS == 0 || i < BN * CH) {
      const int r = i / CH, c = i % CH;
      unsigned char* d = FMT == BF16 ? dst + (r * LD + c * 8) * 2 : dst + r * Stored<FMT>::bytes + c * 16;
      cp_async16(d, base + (row0 + r) * row_bytes + k_bytes + c * 16, true);
    }
  }
  if constexpr (FMT == INT4) {
    // The (scale, zero) of every group the tile touches, row by row, travel with the tile: the
    // converter then reads shared memory only. cp.async moves 4 bytes at least, so each goes as the
    // aligned word that holds it (scale g in word g/2, zero g in word g/4); the converter picks its
    // half or byte. The last word may reach up to 3 bytes past the tensor, inside its allocation
    // (the host checks 4-byte alignment; torch rounds allocations up to 512 bytes).
    uint32_t* words = reinterpret_cast<uint32_t*>(dst + BN * Stored<FMT>::bytes);
    const int g0 = W.group_of(k0), span = W.group_of(k0 + BK - 1) - g0 + 1;
    static_assert(THREADS % BN == 0, "a thread stages one row's words");
    const int r = threadIdx.x % BN;
    const int64_t g_row = (row0 + r) * W.groups + g0;  // the row's first group in this tile
#pragma unroll
    for (int j = 0; j < SLOTS * BN / THREADS; ++j) {
      const int slot = threadIdx.x / BN + j * (THREADS / BN);
      if (slot < span) {
        const int64_t g = g_row + slot;
        cp_async4(words + slot * BN + r, reinterpret_cast<const uint32_t*>(W.scale) + (g >> 1));
        cp_async4(words + (SLOTS + slot) * BN + r, reinterpret_cast<const uint32_t*>(W.zero) + (g >> 2));
      }
    }
  }
}

// int8 / int4: the stage's raw bytes -> the bf16 tile (BN rows x BK). int8 exactly (its scale is
// applied in the epilogue); int4 as (q - zero) * scale rounded to bf16, one scale/zero per 8 weights,
// from the words the loader staged.
//
// The integers become floats by bit patterns, not by the slow conversion instructions (I2F).
// int8: 0x4B000000 | u is the fp32 2^23 + u for any u < 2^23, so b ^ 0x80 = b + 128 unsigned, one
// byte permute and one add of -(2^23 + 128) give the exact value; small integers have all their
// bits in an fp32's high half, so two of them pack into a bf16 pair by one more byte permute.
// int4 works on bf16 pairs: 0x4300 | u is the bf16 128 + u for u < 128, so one mask-and-or turns
// two nibbles into (128 + q_a, 128 + q_b); one bf16x2 fma subtracts 128 + zero (exact: q - zero),
// a second multiplies by the scale and rounds once: the reference's fp32 product rounded to bf16
// (quant.dequantize_int4), as the product of a 5-bit integer and a bf16 is exact in fp32 and the
// addend -0 keeps a zero's sign. Zero points are in [0, 15], as quant.py writes them.
__device__ __forceinline__ uint32_t fma_bf16x2(uint32_t a, uint32_t b, uint32_t c) {  // a * b + c, rounded once
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
__device__ __forceinline__ uint32_t nibble_pair(uint32_t q) {  // (q & 0x000F000F) | 0x43004300 in one LOP3
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(q), "n"(0x000F000F), "n"(0x43004300));
  return d;
}

template <int FMT>
__device__ __forceinline__ void convert(__nv_bfloat16* tile, const unsigned char* raw, const Weights& W, int64_t row0,
                                        int k0) {
  if constexpr (FMT == INT8) {
#pragma unroll
    for (int t = 0; t < BN * (BK / 8) / THREADS; ++t) {  // 8 weights a thread-step
      const int i = threadIdx.x + t * THREADS;
      const int r = i / (BK / 8), c = (i % (BK / 8)) * 8;
      const uint2 q = *reinterpret_cast<const uint2*>(raw + r * BK + c);
      uint32_t out[4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t x = (h ? q.y : q.x) ^ 0x80808080u;  // each byte b + 128
        float f[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) f[j] = __uint_as_float(__byte_perm(x, 0x4B000000u, 0x7540 + j)) - 8388736.f;
        out[2 * h] = __byte_perm(__float_as_uint(f[0]), __float_as_uint(f[1]), 0x7632);  // (f0, f1) as bf16
        out[2 * h + 1] = __byte_perm(__float_as_uint(f[2]), __float_as_uint(f[3]), 0x7632);
      }
      *reinterpret_cast<uint4*>(tile + r * LD + c) = make_uint4(out[0], out[1], out[2], out[3]);
    }
  } else if constexpr (FMT == INT4) {
    // A thread converts the same 8 inputs (one group: group % 8 == 0) of rows r, r + 16, r + 32, ...;
    // rows 16 apart sit a multiple of 4 groups apart, so the scale's half and the zero's byte in
    // their words are the same for all of them: worked out once.
    constexpr int ROW_STEP = THREADS / (BK / 8);
    static_assert(ROW_STEP % 4 == 0 && BN % ROW_STEP == 0, "a thread's rows keep their place in the words");
    const uint32_t* words = reinterpret_cast<const uint32_t*>(raw + BN * Stored<FMT>::bytes);
    const int r0 = threadIdx.x / (BK / 8), c = (threadIdx.x % (BK / 8)) * 8;
    const int gk = W.group_of(k0 + c), slot = gk - W.group_of(k0);
    const uint32_t at = static_cast<uint32_t>((row0 + r0) * W.groups + gk);  // the pair's index, low bits
    // byte permutes that copy the scale's half into both halves, and the zero's byte under 0xC3 twice
    const uint32_t s_sel = at & 1 ? 0x3232u : 0x1010u, z_sel = 0x4040u | (at & 3) * 0x0101u;
#pragma unroll
    for (int t = 0; t < BN / ROW_STEP; ++t) {  // 8 weights (4 bytes) a step
      const int r = r0 + t * ROW_STEP;
      const uint32_t scale = __byte_perm(words[slot * BN + r], 0, s_sel);                     // (s, s)
      const uint32_t minus = __byte_perm(words[(SLOTS + slot) * BN + r], 0xC3C3C3C3u, z_sel);  // -(128 + z), twice
      const uint32_t q = *reinterpret_cast<const uint32_t*>(raw + r * (BK / 2) + c / 2);  // nibble j: input c + j
      uint32_t w[4];  // w[j] = (weight j, weight j + 4)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t x = nibble_pair(q >> (4 * j));  // (128 + q_j, 128 + q_{j+4})
        w[j] = fma_bf16x2(fma_bf16x2(x, 0x3F803F80u, minus), scale, 0x80008000u);  // (x - (128 + z)) * s + -0
      }
      *reinterpret_cast<uint4*>(tile + r * LD + c) =
          make_uint4(__byte_perm(w[0], w[1], 0x5410), __byte_perm(w[2], w[3], 0x5410),   // (0, 1), (2, 3)
                     __byte_perm(w[0], w[1], 0x7632), __byte_perm(w[2], w[3], 0x7632));  // (4, 5), (6, 7)
    }
  }
}

// the per-row scale that INT8 applies in the epilogue (1 otherwise)
template <int FMT>
__device__ __forceinline__ float row_scale(const Weights& W, int64_t row) {
  if constexpr (FMT == INT8) return __bfloat162float(W.scale[row]);
  return 1.f;
}

// Shared memory of a block with `mats` weight matrices (1 or 2): STAGES x (activation tile +
// weight tiles as stored), then (int8/int4 only) one bf16 tile per matrix for the converted weights.
template <int FMT> struct Smem {
  static constexpr int act = BM * LD * 2;
  static constexpr int stored = FMT == BF16 ? BN * LD * 2 : BN * Stored<FMT>::bytes + Stored<FMT>::params;
  static constexpr int converted = FMT == BF16 ? 0 : BN * LD * 2;
  static constexpr int stage(int mats) { return act + mats * stored; }
  static constexpr int total(int mats) {
    const int main = STAGES * stage(mats) + mats * converted;
    const int epilogue = mats * BM * OUT_LD * 4;  // the fp32 result tile(s), after the main loop
    return main > epilogue ? main : epilogue;
  }
};

// The K loop both kernels share: acc[m][mat] += A(rows) . W_mat(cols)^T over k = 0..K, with the
// cp.async ring. A rows come from `act` (bf16, ld, through row_index); MATS weight matrices start
// at rows row0[mat].
template <int FMT, int MATS>
__device__ __forceinline__ void mainloop(unsigned char* smem, const __nv_bfloat16* act, const int* row_index,
                                         int valid, int64_t ld, const Weights& W, const int64_t (&row0)[MATS], int K,
                                         Acc (&acc)[BM / 16][MATS]) {
  using S = Smem<FMT>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, KT = K / BK;
  auto stage_act = [&](int s) { return reinterpret_cast<__nv_bfloat16*>(smem + s * S::stage(MATS)); };
  auto stage_w = [&](int s, int m) { return smem + s * S::stage(MATS) + S::act + m * S::stored; };
  auto tile = [&](int s, int m) {  // the bf16 weight tile the tensor cores read
    return FMT == BF16 ? reinterpret_cast<__nv_bfloat16*>(stage_w(s, m))
                       : reinterpret_cast<__nv_bfloat16*>(smem + STAGES * S::stage(MATS) + m * S::converted);
  };
  auto issue = [&](int kt) {
    const int s = kt % STAGES;
    issue_rows(stage_act(s), act, row_index, valid, ld, kt * BK);
#pragma unroll
    for (int m = 0; m < MATS; ++m) issue_weights<FMT>(stage_w(s, m), W, row0[m], kt * BK);
  };
#pragma unroll
  for (int i = 0; i < BM / 16; ++i)
#pragma unroll
    for (int m = 0; m < MATS; ++m)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][m][j / 4][j % 4] = 0.f;

  // prologue: STAGES-1 tiles in flight (a group is committed even when empty: the counts stay aligned)
#pragma unroll
  for (int kt = 0; kt < STAGES - 1; ++kt) {
    if (kt < KT) issue(kt);
    cp_async_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();  // tile kt has landed (this thread's part of it)
    __syncthreads();              // ... everyone's part; and everyone is done with tile kt-1's buffers
    if (kt + STAGES - 1 < KT) issue(kt + STAGES - 1);  // into the buffer tile kt-1 used
    cp_async_commit();
    const int s = kt % STAGES;
    if constexpr (FMT != BF16) {
#pragma unroll
      for (int m = 0; m < MATS; ++m) convert<FMT>(tile(s, m), stage_w(s, m), W, row0[m], kt * BK);
      __syncthreads();  // the converted tiles are complete before any warp reads them
    }
    const __nv_bfloat16* A = stage_act(s);
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      // W^T as the column-major B: the tile's rows are output columns, k contiguous. Lane l points
      // at block l/8: (columns 0-7 | 8-15) x (k 0-7 | 8-15) -> b[0] = (half 0, k 0-7), b[1] = (half
      // 0, k 8-15), b[2], b[3] the same for half 1.
      uint32_t b[MATS][4];
#pragma unroll
      for (int m = 0; m < MATS; ++m)
        ldmatrix_x4(b[m], tile(s, m) + (warp * 16 + (lane / 16) * 8 + lane % 8) * LD + kk + ((lane / 8) % 2) * 8);
#pragma unroll
      for (int i = 0; i < BM / 16; ++i) {
        if (i * 16 < valid) {  // row tiles past the expert's count hold zeros: skip them
          // A: lane l points at row l % 16, k (l / 16) * 8 -> rows 0-7 | 8-15 of k 0-7, then of k 8-15
          uint32_t a[4];
          ldmatrix_x4(a, A + (i * 16 + lane % 16) * LD + kk + (lane / 16) * 8);
#pragma unroll
          for (int m = 0; m < MATS; ++m) {
            mma_16816(acc[i][m][0], a, b[m][0], b[m][1]);
            mma_16816(acc[i][m][1], a, b[m][2], b[m][3]);
          }
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring is drained and read: the epilogue may reuse the memory
}

// Step 1: h[a, n] = bf16(gelu(bf16(x[tok(a)] . gate[e, n]))) * bf16(x[tok(a)] . up[e, n]), rows a of expert e.
template <int FMT>
__global__ void __launch_bounds__(THREADS) gate_up_kernel(const __nv_bfloat16* __restrict__ x,  // (T, D)
                                                          const Weights gate_up,                // (E, 2I, D)
                                                          const int* __restrict__ sorted_token, // (A,)
                                                          const int* __restrict__ offsets,      // (E + 1,)
                                                          __nv_bfloat16* __restrict__ h,        // (A, I)
                                                          int D, int I) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int e = blockIdx.y, n0 = blockIdx.x * BN, warp = threadIdx.x / 32;
  const int row_begin = offsets[e], row_end = offsets[e + 1];
  const int64_t rows[2] = {(int64_t)e * 2 * I + n0, (int64_t)e * 2 * I + I + n0};  // gate rows, up rows
  auto out = reinterpret_cast<float(*)[BM][OUT_LD]>(smem);  // [gate | up][BM][OUT_LD]
  for (int m0 = row_begin; m0 < row_end; m0 += BM) {  // usually a single chunk
    const int valid = min(BM, row_end - m0);
    Acc acc[BM / 16][2];
    mainloop<FMT, 2>(smem, x, sorted_token + m0, valid, D, gate_up, rows, D, acc);
#pragma unroll
    for (int i = 0; i < BM / 16; ++i) {
      store_acc(&out[0][0][0], acc[i][0], i * 16, warp * 16);
      store_acc(&out[1][0][0], acc[i][1], i * 16, warp * 16);
    }
    __syncthreads();  // the result tiles are complete
    for (int i = threadIdx.x; i < valid * BN; i += THREADS) {
      const int r = i / BN, c = i % BN;
      const float g = bf16_round(out[0][r][c] * row_scale<FMT>(gate_up, rows[0] + c));
      const float u = bf16_round(out[1][r][c] * row_scale<FMT>(gate_up, rows[1] + c));
      h[(int64_t)(m0 + r) * I + n0 + c] = __float2bfloat16(bf16_round(gelu_tanh(g)) * u);
    }
    __syncthreads();  // the result tiles are read before the next chunk's ring overwrites them
  }
}

// Step 2: out[a, n] = w[a] * bf16(h[a] . down[e, n]) in fp32, at a's original index, rows a of expert e.
template <int FMT>
__global__ void __launch_bounds__(THREADS) down_kernel(const __nv_bfloat16* __restrict__ h,      // (A, I)
                                                       const Weights down,                       // (E, D, I)
                                                       const int* __restrict__ sorted_assign,    // (A,) t*K + s
                                                       const float* __restrict__ sorted_weight,  // (A,)
                                                       const int* __restrict__ offsets,          // (E + 1,)
                                                       float* __restrict__ out,                  // (A, D)
                                                       int D, int I) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int rows_of_h[BM];  // h is already in sorted order: row r of the chunk is h[m0 + r]
  const int e = blockIdx.y, n0 = blockIdx.x * BN, warp = threadIdx.x / 32;
  const int row_begin = offsets[e], row_end = offsets[e + 1];
  const int64_t rows[1] = {(int64_t)e * D + n0};
  auto res = reinterpret_cast<float(*)[OUT_LD]>(smem);
  for (int m0 = row_begin; m0 < row_end; m0 += BM) {
    const int valid = min(BM, row_end - m0);
    for (int i = threadIdx.x; i < BM; i += THREADS) rows_of_h[i] = m0 + i;
    __syncthreads();  // the row list is written before the loaders read it
    Acc acc[BM / 16][1];
    mainloop<FMT, 1>(smem, h, rows_of_h, valid, I, down, rows, I, acc);
#pragma unroll
    for (int i = 0; i < BM / 16; ++i)
      store_acc(&res[0][0], acc[i][0], i * 16, warp * 16);
    __syncthreads();  // the result tile is complete
    // the routing weight in fp32 on the bf16 expert output; one write per element
    for (int i = threadIdx.x; i < valid * BN; i += THREADS) {
      const int r = i / BN, c = i % BN;
      out[(int64_t)sorted_assign[m0 + r] * D + n0 + c] =
          sorted_weight[m0 + r] * bf16_round(res[r][c] * row_scale<FMT>(down, rows[0] + c));
    }
    __syncthreads();  // read before the next chunk reuses the memory and the row list
  }
}

#ifdef FUSED_MOE_CONVERT_PROBE
// Built only by scripts/sass_counts.py: one tile's conversion alone, so that the instructions per
// weight of int8 and int4 can be counted in the SASS.
template <int FMT>
__global__ void __launch_bounds__(THREADS) convert_probe(__nv_bfloat16* out, const Weights W, int64_t row0, int k0) {
  extern __shared__ __align__(128) unsigned char smem[];
  convert<FMT>(reinterpret_cast<__nv_bfloat16*>(smem), smem + BN * LD * 2, W, row0, k0);
  __syncthreads();
  out[threadIdx.x] = reinterpret_cast<__nv_bfloat16*>(smem)[threadIdx.x];
}
template __global__ void convert_probe<INT8>(__nv_bfloat16*, const Weights, int64_t, int);
template __global__ void convert_probe<INT4>(__nv_bfloat16*, const Weights, int64_t, int);
#endif

}  // namespace

static Weights weights_of(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero, int fmt, int64_t K,
                          int group) {
  int shift = -1;
  for (int b = 0; b < 31; ++b)
    if (group == (1 << b)) shift = b;
  return Weights{w.data_ptr(), fmt == BF16 ? nullptr : reinterpret_cast<const __nv_bfloat16*>(scale.data_ptr()),
                 fmt == INT4 ? zero.data_ptr<uint8_t>() : nullptr, K, group, group > 0 ? K / group : 0, shift};
}

template <int FMT>
static void launch(const at::Tensor& x, const Weights& gu, const Weights& dn, const at::Tensor& sorted_token,
                   const at::Tensor& sorted_assign, const at::Tensor& sorted_weight, const at::Tensor& offsets,
                   at::Tensor& h, at::Tensor& out, int E, int D, int I) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  constexpr int smem_gu = Smem<FMT>::total(2), smem_dn = Smem<FMT>::total(1);
  // more than the default 48 KB of dynamic shared memory: opt in (legal during graph capture too)
  C10_CUDA_CHECK(cudaFuncSetAttribute(gate_up_kernel<FMT>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_gu));
  C10_CUDA_CHECK(cudaFuncSetAttribute(down_kernel<FMT>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_dn));
  gate_up_kernel<FMT><<<dim3(I / BN, E), THREADS, smem_gu, stream>>>(
      reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), gu, sorted_token.data_ptr<int>(), offsets.data_ptr<int>(),
      reinterpret_cast<__nv_bfloat16*>(h.data_ptr()), D, I);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  down_kernel<FMT><<<dim3(D / BN, E), THREADS, smem_dn, stream>>>(
      reinterpret_cast<const __nv_bfloat16*>(h.data_ptr()), dn, sorted_assign.data_ptr<int>(),
      sorted_weight.data_ptr<float>(), offsets.data_ptr<int>(), out.data_ptr<float>(), D, I);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

static void check_aligned(const at::Tensor& t, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, ": 16-byte aligned data expected");
}

// x (T, D) bf16; sorted_token, sorted_assign, sorted_weight (A,) in expert order; offsets (E + 1,)
// int32. fmt 0 bf16: gate_up (E, 2I, D), down (E, D, I); fmt 1 int8: the same shapes in int8 plus
// bf16 scales (E, rows); fmt 2 int4: (E, rows, inputs/2) uint8 plus bf16 scales and uint8 zero
// points (E, rows, inputs/group). Returns out (A, D) fp32: row a is assignment a's weighted output.
at::Tensor fused_moe(at::Tensor x, at::Tensor sorted_token, at::Tensor sorted_assign, at::Tensor sorted_weight,
                     at::Tensor offsets, at::Tensor gate_up, at::Tensor gate_up_scale, at::Tensor gate_up_zero,
                     at::Tensor down, at::Tensor down_scale, at::Tensor down_zero, int64_t fmt, int64_t group,
                     int64_t I) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.dim() == 2,
              "x: contiguous (T, D) CUDA bf16");
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(fmt == BF16 || fmt == INT8 || fmt == INT4, "fmt: 0 bf16, 1 int8, 2 int4");
  TORCH_CHECK(gate_up.is_contiguous() && down.is_contiguous() && gate_up.dim() == 3 && down.dim() == 3,
              "weights: 3-D contiguous");
  for (const at::Tensor* t : {&sorted_token, &sorted_assign, &offsets})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->device() == x.device(), "indices: int32");
  TORCH_CHECK(sorted_weight.scalar_type() == at::kFloat && sorted_weight.is_contiguous(), "weights: fp32");
  const auto want = fmt == BF16 ? at::kBFloat16 : fmt == INT8 ? at::kChar : at::kByte;
  TORCH_CHECK(gate_up.scalar_type() == want && down.scalar_type() == want, "weight dtype does not match fmt");
  const int64_t D = x.size(1), E = gate_up.size(0), A = sorted_token.numel();
  const int64_t packed = fmt == INT4 ? 2 : 1;  // int4 packs two inputs a byte
  TORCH_CHECK(gate_up.size(1) == 2 * I && gate_up.size(2) * packed == D && down.size(0) == E && down.size(1) == D &&
              down.size(2) * packed == I, "shapes disagree: gate_up (E, 2I, D), down (E, D, I)");
  TORCH_CHECK(D % BN == 0 && I % BN == 0 && D % BK == 0 && I % BK == 0, "D and I must be multiples of 64");
  TORCH_CHECK(offsets.numel() == E + 1 && sorted_assign.numel() == A && sorted_weight.numel() == A,
              "offsets (E + 1,), sorted lists (A,)");
  if (fmt != BF16) {
    TORCH_CHECK(gate_up_scale.scalar_type() == at::kBFloat16 && down_scale.scalar_type() == at::kBFloat16 &&
                gate_up_scale.is_contiguous() && down_scale.is_contiguous(), "scales: contiguous bf16");
    const int64_t gu_cols = fmt == INT8 ? 1 : D / group, dn_cols = fmt == INT8 ? 1 : I / group;
    TORCH_CHECK(gate_up_scale.numel() == E * 2 * I * gu_cols && down_scale.numel() == E * D * dn_cols,
                "scales: one per row (int8) or per row and group (int4)");
  }
  if (fmt == INT4) {
    TORCH_CHECK(group % 8 == 0 && D % group == 0 && I % group == 0, "int4 group must divide D and I, multiple of 8");
    TORCH_CHECK(gate_up_zero.scalar_type() == at::kByte && down_zero.scalar_type() == at::kByte &&
                gate_up_zero.numel() == E * 2 * I * (D / group) && down_zero.numel() == E * D * (I / group),
                "zero points: uint8, one per row and group");
  }
  for (const at::Tensor* t : {&x, &gate_up, &down}) check_aligned(*t, "x / gate_up / down");
  if (fmt == INT4)  // the loader moves scales and zero points as aligned 32-bit words
    for (const at::Tensor* t : {&gate_up_scale, &gate_up_zero, &down_scale, &down_zero})
      TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 4 == 0, "int4 scales and zero points: 4-byte aligned");
  auto h = at::empty({A, I}, x.options());
  auto out = at::empty({A, D}, x.options().dtype(at::kFloat));
  if (A > 0) {
    Weights gu = weights_of(gate_up, gate_up_scale, gate_up_zero, fmt, D, group);
    Weights dn = weights_of(down, down_scale, down_zero, fmt, I, group);
    if (fmt == BF16) launch<BF16>(x, gu, dn, sorted_token, sorted_assign, sorted_weight, offsets, h, out, E, D, I);
    else if (fmt == INT8) launch<INT8>(x, gu, dn, sorted_token, sorted_assign, sorted_weight, offsets, h, out, E, D, I);
    else launch<INT4>(x, gu, dn, sorted_token, sorted_assign, sorted_weight, offsets, h, out, E, D, I);
  }
  return out;
}
