// Fused mixture-of-experts for the denoising canvas: a grouped GEMM that streams every expert's
// weights once per step.
//
// Build: JIT-compiled by cuda_kernels/__init__.py with torch.utils.cpp_extension.load
// (sm_90a on Hopper, the device's own arch elsewhere; needs sm_80+ for bf16 tensor cores).
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
// Layout of the work:
//   0. (host side, torch ops, no synchronisation) assignments a = t*K + s are sorted by expert;
//      offsets[e] .. offsets[e+1] are expert e's rows of the sorted list.
//   1. gate_up_kernel: grid (I / BN, E). A block owns BN columns of one expert's gate AND up
//      projections, walks the expert's rows in chunks of BM, and for each chunk streams its weight
//      tile along D in steps of BK: gate and up are computed together, the epilogue applies
//      gelu_tanh(gate) * up and writes h (sorted order, bf16). With BM = 64 rows per chunk an
//      expert of the 256-token canvas (about 16 rows) reads its weights exactly once.
//   2. down_kernel: grid (D / BN, E). Same walk over h @ down_e^T; the epilogue multiplies by the
//      fp32 routing weight and writes the fp32 row of the assignment at its original index.
//   Tensor cores through WMMA 16x16x16 bf16 fragments with fp32 accumulators.
//   Grid: (704/64) * 128 = 1408 and (2816/64) * 128 = 5632 blocks: every SM is busy.
//
// Weights come in three formats (quantize.py), a template parameter of both kernels:
//   BF16  as stored in the checkpoint;
//   INT8  int8 per output row with a bf16 scale per row: the main loop converts q to bf16 (exact),
//         the epilogue multiplies the row's fp32 sum by its scale (it factors out of the sum);
//   INT4  two per byte (low nibble first) with a bf16 scale and a uint8 zero point per row and group
//         of `group` inputs: the main loop dequantises (q - zero) * scale into the bf16 tile.
// Only load_weight_tile() and the epilogue's row scale differ between the formats.

// Only the ATen headers it needs (not torch/extension.h): a quarter of the compile time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <mma.h>

using namespace nvcuda;

namespace {

constexpr int BM = 64;   // rows (token assignments) per chunk
constexpr int BN = 64;   // output columns per block
constexpr int BK = 32;   // reduction step
constexpr int PAD = 8;   // shared-memory row padding (bf16 elements) against bank conflicts
constexpr int WARPS = 4; // each warp owns 16 output columns and all BM rows

__device__ __forceinline__ float bf16_round(float x) { return __bfloat162float(__float2bfloat16(x)); }

__device__ __forceinline__ float gelu_tanh(float x) {
  // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as F.gelu(approximate="tanh")
  const float k0 = 0.7978845608028654f, k1 = 0.044715f;
  return 0.5f * x * (1.f + tanhf(k0 * (x + k1 * x * x * x)));
}

// Copy a [rows x BK] bf16 tile (row stride ld) into shared memory, 16-byte vectors; rows >= valid
// are zero. Used for the activations.
__device__ __forceinline__ void load_rows(__nv_bfloat16 (*dst)[BK + PAD], const __nv_bfloat16* src,
                                          const int* row_index, int rows, int valid, int64_t ld, int k0) {
  constexpr int VEC = 8;  // 8 bf16 = 16 bytes
  for (int i = threadIdx.x; i < rows * (BK / VEC); i += blockDim.x) {
    int r = i / (BK / VEC), c = (i % (BK / VEC)) * VEC;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < valid) v = *reinterpret_cast<const uint4*>(src + (int64_t)row_index[r] * ld + k0 + c);
    *reinterpret_cast<uint4*>(&dst[r][c]) = v;
  }
}

enum Format { BF16 = 0, INT8 = 1, INT4 = 2 };

// One weight matrix in any format. Row r holds input k at: bf16/int8 w[r * K + k], int4 byte
// w[r * K/2 + k/2] (nibble k % 2); int4 scale/zero at [r * K/group + k/group]; int8 scale at [r].
struct Weights {
  const void* w;
  const __nv_bfloat16* scale;
  const uint8_t* zero;
  int64_t K;
  int group;
};

// The weight tile: BN rows of W from row `row0`, inputs k0..k0+BK, as bf16 in shared memory.
template <int FMT>
__device__ __forceinline__ void load_weight_tile(__nv_bfloat16 (*dst)[BK + PAD], const Weights& W, int64_t row0, int k0) {
  constexpr int VEC = 8;  // 8 weights per thread per step
  for (int i = threadIdx.x; i < BN * (BK / VEC); i += blockDim.x) {
    int r = i / (BK / VEC), c = (i % (BK / VEC)) * VEC;
    int64_t row = row0 + r;
    if constexpr (FMT == BF16) {
      *reinterpret_cast<uint4*>(&dst[r][c]) =
          *reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(W.w) + row * W.K + k0 + c);
    } else if constexpr (FMT == INT8) {
      const int8_t* q = static_cast<const int8_t*>(W.w) + row * W.K + k0 + c;
      int2 raw = *reinterpret_cast<const int2*>(q);  // 8 x int8
      const int8_t* b = reinterpret_cast<const int8_t*>(&raw);
#pragma unroll
      for (int j = 0; j < VEC; ++j) dst[r][c + j] = __float2bfloat16((float)b[j]);  // exact: |q| <= 127
    } else {  // INT4
      const uint8_t* q = static_cast<const uint8_t*>(W.w) + row * (W.K / 2) + (k0 + c) / 2;
      uint32_t raw = *reinterpret_cast<const uint32_t*>(q);  // 8 x int4
      int64_t g = row * (W.K / W.group);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        int k = k0 + c + j;
        float s = __bfloat162float(W.scale[g + k / W.group]);
        float z = (float)W.zero[g + k / W.group];
        float v = (float)((raw >> (4 * j)) & 15u);
        dst[r][c + j] = __float2bfloat16((v - z) * s);
      }
    }
  }
}

// the per-row scale that INT8 applies in the epilogue (1 otherwise)
template <int FMT>
__device__ __forceinline__ float row_scale(const Weights& W, int64_t row) {
  if constexpr (FMT == INT8) return __bfloat162float(W.scale[row]);
  return 1.f;
}

// Step 1: h[a, n] = gelu(x[tok(a)] . gate[e, n]) * (x[tok(a)] . up[e, n]) for the rows a of expert e.
template <int FMT>
__global__ void gate_up_kernel(const __nv_bfloat16* __restrict__ x,        // (T, D)
                               const Weights gate_up,                      // (E, 2I, D)
                               const int* __restrict__ sorted_token,       // (A,) token of sorted row
                               const int* __restrict__ offsets,            // (E + 1,)
                               __nv_bfloat16* __restrict__ h,              // (A, I) sorted order
                               int D, int I) {
  // the operand tiles and the fp32 epilogue tile are never live together: they share the memory
  constexpr int TILE_BYTES = (BM + 2 * BN) * (BK + PAD) * 2, OUT_BYTES = 2 * BM * (BN + 4) * 4;
  __shared__ __align__(128) unsigned char smem[TILE_BYTES > OUT_BYTES ? TILE_BYTES : OUT_BYTES];
  auto sX = reinterpret_cast<__nv_bfloat16 (*)[BK + PAD]>(smem);
  auto sG = reinterpret_cast<__nv_bfloat16 (*)[BK + PAD]>(smem + BM * (BK + PAD) * 2);
  auto sU = reinterpret_cast<__nv_bfloat16 (*)[BK + PAD]>(smem + (BM + BN) * (BK + PAD) * 2);
  auto sOut = reinterpret_cast<float (*)[BM][BN + 4]>(smem);

  const int e = blockIdx.y, n0 = blockIdx.x * BN, warp = threadIdx.x / 32;
  const int row_begin = offsets[e], row_end = offsets[e + 1];
  const int64_t g_row0 = (int64_t)e * 2 * I + n0, u_row0 = g_row0 + I;  // gate rows, then up rows

  for (int m0 = row_begin; m0 < row_end; m0 += BM) {  // usually a single chunk
    const int valid = min(BM, row_end - m0);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_g[BM / 16], acc_u[BM / 16];
    for (int i = 0; i < BM / 16; ++i) { wmma::fill_fragment(acc_g[i], 0.f); wmma::fill_fragment(acc_u[i], 0.f); }
    for (int k0 = 0; k0 < D; k0 += BK) {
      load_rows(sX, x, sorted_token + m0, BM, valid, D, k0);
      load_weight_tile<FMT>(sG, gate_up, g_row0, k0);
      load_weight_tile<FMT>(sU, gate_up, u_row0, k0);
      __syncthreads();  // tiles complete before any warp reads them
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> bg, bu;
        wmma::load_matrix_sync(bg, &sG[warp * 16][kk], BK + PAD);  // W^T as column-major
        wmma::load_matrix_sync(bu, &sU[warp * 16][kk], BK + PAD);
        for (int i = 0; i < BM / 16; ++i) {
          if (i * 16 >= valid) break;  // rows past the expert's count hold zeros: skip them
          wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
          wmma::load_matrix_sync(a, &sX[i * 16][kk], BK + PAD);
          wmma::mma_sync(acc_g[i], a, bg, acc_g[i]);
          wmma::mma_sync(acc_u[i], a, bu, acc_u[i]);
        }
      }
      __syncthreads();  // everyone done with the tiles before the next load overwrites them
    }
    // epilogue: gelu_tanh(gate) * up, rounded to bf16 where the plain path's tensors are
    for (int i = 0; i < BM / 16; ++i) {
      wmma::store_matrix_sync(&sOut[0][i * 16][warp * 16], acc_g[i], BN + 4, wmma::mem_row_major);
      wmma::store_matrix_sync(&sOut[1][i * 16][warp * 16], acc_u[i], BN + 4, wmma::mem_row_major);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < valid * BN; i += blockDim.x) {
      int r = i / BN, c = i % BN;
      float g = bf16_round(sOut[0][r][c] * row_scale<FMT>(gate_up, g_row0 + c));
      float u = bf16_round(sOut[1][r][c] * row_scale<FMT>(gate_up, u_row0 + c));
      h[(int64_t)(m0 + r) * I + n0 + c] = __float2bfloat16(bf16_round(gelu_tanh(g)) * u);
    }
    __syncthreads();
  }
}

// Step 2: out[a, n] = w[a] * bf16(h[a] . down[e, n]) in fp32, at a's original index, for the rows
// a of expert e.
template <int FMT>
__global__ void down_kernel(const __nv_bfloat16* __restrict__ h,       // (A, I) sorted order
                            const Weights down,                        // (E, D, I)
                            const int* __restrict__ sorted_assign,     // (A,) original index t*K + s
                            const float* __restrict__ sorted_weight,   // (A,)
                            const int* __restrict__ offsets,           // (E + 1,)
                            float* __restrict__ out,                   // (A, D) fp32
                            int D, int I) {
  __shared__ __align__(128) __nv_bfloat16 sH[BM][BK + PAD];
  __shared__ __align__(128) __nv_bfloat16 sW[BN][BK + PAD];
  __shared__ __align__(128) float sOut[BM][BN + 4];
  __shared__ int sRow[BM];

  const int e = blockIdx.y, n0 = blockIdx.x * BN, warp = threadIdx.x / 32;
  const int row_begin = offsets[e], row_end = offsets[e + 1];
  const int64_t row0 = (int64_t)e * D + n0;

  for (int m0 = row_begin; m0 < row_end; m0 += BM) {
    const int valid = min(BM, row_end - m0);
    for (int i = threadIdx.x; i < BM; i += blockDim.x) sRow[i] = m0 + i;  // h is already sorted
    __syncthreads();
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[BM / 16];
    for (int i = 0; i < BM / 16; ++i) wmma::fill_fragment(acc[i], 0.f);
    for (int k0 = 0; k0 < I; k0 += BK) {
      load_rows(sH, h, sRow, BM, valid, I, k0);
      load_weight_tile<FMT>(sW, down, row0, k0);
      __syncthreads();
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b;
        wmma::load_matrix_sync(b, &sW[warp * 16][kk], BK + PAD);
        for (int i = 0; i < BM / 16; ++i) {
          if (i * 16 >= valid) break;
          wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
          wmma::load_matrix_sync(a, &sH[i * 16][kk], BK + PAD);
          wmma::mma_sync(acc[i], a, b, acc[i]);
        }
      }
      __syncthreads();
    }
    for (int i = 0; i < BM / 16; ++i)
      wmma::store_matrix_sync(&sOut[i * 16][warp * 16], acc[i], BN + 4, wmma::mem_row_major);
    __syncthreads();
    // epilogue: the routing weight in fp32 on the bf16 expert output; one write per element
    for (int i = threadIdx.x; i < valid * BN; i += blockDim.x) {
      int r = i / BN, c = i % BN;
      out[(int64_t)sorted_assign[m0 + r] * D + n0 + c] =
          sorted_weight[m0 + r] * bf16_round(sOut[r][c] * row_scale<FMT>(down, row0 + c));
    }
    __syncthreads();
  }
}

}  // namespace

Weights weights_of(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero, int fmt,
                   int64_t K, int group) {
  return Weights{w.data_ptr(), fmt == BF16 ? nullptr : reinterpret_cast<const __nv_bfloat16*>(scale.data_ptr()),
                 fmt == INT4 ? zero.data_ptr<uint8_t>() : nullptr, K, group};
}

template <int FMT>
void launch(const at::Tensor& x, const Weights& gu, const Weights& dn, const at::Tensor& sorted_token,
            const at::Tensor& sorted_assign, const at::Tensor& sorted_weight, const at::Tensor& offsets,
            at::Tensor& h, at::Tensor& out, int E, int D, int I) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  gate_up_kernel<FMT><<<dim3(I / BN, E), 32 * WARPS, 0, stream>>>(
      reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), gu, sorted_token.data_ptr<int>(), offsets.data_ptr<int>(),
      reinterpret_cast<__nv_bfloat16*>(h.data_ptr()), D, I);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  down_kernel<FMT><<<dim3(D / BN, E), 32 * WARPS, 0, stream>>>(
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
  const int64_t T = x.size(0), D = x.size(1), E = gate_up.size(0), A = sorted_token.numel();
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
  auto h = at::empty({A, I}, x.options());
  auto out = at::empty({A, D}, x.options().dtype(at::kFloat));
  if (A > 0) {
    Weights gu = weights_of(gate_up, gate_up_scale, gate_up_zero, fmt, D, group);
    Weights dn = weights_of(down, down_scale, down_zero, fmt, I, group);
    if (fmt == BF16) launch<BF16>(x, gu, dn, sorted_token, sorted_assign, sorted_weight, offsets, h, out, E, D, I);
    else if (fmt == INT8) launch<INT8>(x, gu, dn, sorted_token, sorted_assign, sorted_weight, offsets, h, out, E, D, I);
    else launch<INT4>(x, gu, dn, sorted_token, sorted_assign, sorted_weight, offsets, h, out, E, D, I);
  }
  (void)T;
  return out;
}
