// Fused mixture-of-experts for the denoising canvas: a grouped GEMM that streams every expert's
// weights once per step.
//
// Build: JIT-compiled by cuda_kernels/__init__.py with torch.utils.cpp_extension.load
// (sm_90a on Hopper, the device's own arch elsewhere; needs sm_80+ for bf16 tensor cores).
//
// Math (the reference is moe.Experts.forward, the plain PyTorch path):
//   for every (token t, slot s) with expert e = idx[t, s] and routing weight w = weights[t, s]:
//     h   = gelu_tanh(x_t @ gate_e^T) * (x_t @ up_e^T)         gate_e / up_e = gate_up[e, :I] / [e, I:]
//     y_t += w * (h @ down_e^T)                                  summed over the K slots in fp32
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
//      fp32 routing weight and adds into the fp32 output row of the token (atomicAdd): the router
//      weight and the sum over the top-k are folded into the epilogue.
//   Tensor cores through WMMA 16x16x16 bf16 fragments with fp32 accumulators.
//   Grid: (704/64) * 128 = 1408 and (2816/64) * 128 = 5632 blocks: every SM is busy.
//
// The weight tile is loaded by load_weight_tile(); a quantized checkpoint (int8 / int4 with
// scales) slots in there by dequantising into the same bf16 shared-memory tile.

#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
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

// The weight tile: BN rows of W (each a contiguous run along K) from row n0, columns k0..k0+BK.
// bf16 weights are copied; this is where int8/int4 weights would be dequantised.
__device__ __forceinline__ void load_weight_tile(__nv_bfloat16 (*dst)[BK + PAD], const __nv_bfloat16* W,
                                                 int n0, int64_t ld, int k0) {
  constexpr int VEC = 8;
  for (int i = threadIdx.x; i < BN * (BK / VEC); i += blockDim.x) {
    int r = i / (BK / VEC), c = (i % (BK / VEC)) * VEC;
    *reinterpret_cast<uint4*>(&dst[r][c]) =
        *reinterpret_cast<const uint4*>(W + (int64_t)(n0 + r) * ld + k0 + c);
  }
}

// Step 1: h[a, n] = gelu(x[tok(a)] . gate[e, n]) * (x[tok(a)] . up[e, n]) for the rows a of expert e.
__global__ void gate_up_kernel(const __nv_bfloat16* __restrict__ x,        // (T, D)
                               const __nv_bfloat16* __restrict__ gate_up,  // (E, 2I, D)
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
  const __nv_bfloat16* G = gate_up + (int64_t)e * 2 * I * D;
  const __nv_bfloat16* U = G + (int64_t)I * D;

  for (int m0 = row_begin; m0 < row_end; m0 += BM) {  // usually a single chunk
    const int valid = min(BM, row_end - m0);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_g[BM / 16], acc_u[BM / 16];
    for (int i = 0; i < BM / 16; ++i) { wmma::fill_fragment(acc_g[i], 0.f); wmma::fill_fragment(acc_u[i], 0.f); }
    for (int k0 = 0; k0 < D; k0 += BK) {
      load_rows(sX, x, sorted_token + m0, BM, valid, D, k0);
      load_weight_tile(sG, G, n0, D, k0);
      load_weight_tile(sU, U, n0, D, k0);
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
    // epilogue: gelu_tanh(gate) * up in fp32, one rounding to bf16
    for (int i = 0; i < BM / 16; ++i) {
      wmma::store_matrix_sync(&sOut[0][i * 16][warp * 16], acc_g[i], BN + 4, wmma::mem_row_major);
      wmma::store_matrix_sync(&sOut[1][i * 16][warp * 16], acc_u[i], BN + 4, wmma::mem_row_major);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < valid * BN; i += blockDim.x) {
      int r = i / BN, c = i % BN;
      float v = gelu_tanh(sOut[0][r][c]) * sOut[1][r][c];
      h[(int64_t)(m0 + r) * I + n0 + c] = __float2bfloat16(v);
    }
    __syncthreads();
  }
}

// Step 2: y[tok(a), n] += w[a] * (h[a] . down[e, n]), fp32, for the rows a of expert e.
__global__ void down_kernel(const __nv_bfloat16* __restrict__ h,      // (A, I) sorted order
                            const __nv_bfloat16* __restrict__ down,   // (E, D, I)
                            const int* __restrict__ sorted_token,     // (A,)
                            const float* __restrict__ sorted_weight,  // (A,)
                            const int* __restrict__ offsets,          // (E + 1,)
                            float* __restrict__ y,                    // (T, D) fp32, zeroed
                            int D, int I) {
  __shared__ __align__(128) __nv_bfloat16 sH[BM][BK + PAD];
  __shared__ __align__(128) __nv_bfloat16 sW[BN][BK + PAD];
  __shared__ __align__(128) float sOut[BM][BN + 4];
  __shared__ int sRow[BM];

  const int e = blockIdx.y, n0 = blockIdx.x * BN, warp = threadIdx.x / 32;
  const int row_begin = offsets[e], row_end = offsets[e + 1];
  const __nv_bfloat16* W = down + (int64_t)e * D * I;

  for (int m0 = row_begin; m0 < row_end; m0 += BM) {
    const int valid = min(BM, row_end - m0);
    for (int i = threadIdx.x; i < BM; i += blockDim.x) sRow[i] = m0 + i;  // h is already sorted
    __syncthreads();
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[BM / 16];
    for (int i = 0; i < BM / 16; ++i) wmma::fill_fragment(acc[i], 0.f);
    for (int k0 = 0; k0 < I; k0 += BK) {
      load_rows(sH, h, sRow, BM, valid, I, k0);
      load_weight_tile(sW, W, n0, I, k0);
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
    // epilogue: routing weight and the sum over the top-k slots, in fp32
    for (int i = threadIdx.x; i < valid * BN; i += blockDim.x) {
      int r = i / BN, c = i % BN;
      atomicAdd(&y[(int64_t)sorted_token[m0 + r] * D + n0 + c], sorted_weight[m0 + r] * sOut[r][c]);
    }
    __syncthreads();
  }
}

}  // namespace

// x (T, D) bf16; sorted_token, sorted_weight (A,) in expert order; offsets (E + 1,) int32;
// gate_up (E, 2I, D), down (E, D, I) bf16. Returns (T, D) bf16.
torch::Tensor fused_moe(torch::Tensor x, torch::Tensor sorted_token, torch::Tensor sorted_weight,
                        torch::Tensor offsets, torch::Tensor gate_up, torch::Tensor down) {
  TORCH_CHECK(x.is_cuda() && x.dtype() == torch::kBFloat16 && x.is_contiguous(), "x: contiguous CUDA bf16");
  TORCH_CHECK(gate_up.dtype() == torch::kBFloat16 && gate_up.is_contiguous() && gate_up.dim() == 3, "gate_up: (E, 2I, D) bf16");
  TORCH_CHECK(down.dtype() == torch::kBFloat16 && down.is_contiguous() && down.dim() == 3, "down: (E, D, I) bf16");
  TORCH_CHECK(sorted_token.dtype() == torch::kInt32 && offsets.dtype() == torch::kInt32, "indices: int32");
  TORCH_CHECK(sorted_weight.dtype() == torch::kFloat32, "weights: fp32");
  const int T = x.size(0), D = x.size(1), E = gate_up.size(0), I = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(2) == D && down.size(0) == E && down.size(1) == D && down.size(2) == I, "shapes disagree");
  TORCH_CHECK(D % BN == 0 && I % BN == 0 && D % BK == 0 && I % BK == 0, "D and I must be multiples of 64");
  TORCH_CHECK(offsets.numel() == E + 1, "offsets: (E + 1,)");
  const int A = sorted_token.numel();
  auto h = torch::empty({A, I}, x.options());
  auto y = torch::zeros({T, D}, x.options().dtype(torch::kFloat32));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (A > 0) {
    gate_up_kernel<<<dim3(I / BN, E), 32 * WARPS, 0, stream>>>(
        reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), reinterpret_cast<const __nv_bfloat16*>(gate_up.data_ptr()),
        sorted_token.data_ptr<int>(), offsets.data_ptr<int>(), reinterpret_cast<__nv_bfloat16*>(h.data_ptr()), D, I);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    down_kernel<<<dim3(D / BN, E), 32 * WARPS, 0, stream>>>(
        reinterpret_cast<const __nv_bfloat16*>(h.data_ptr()), reinterpret_cast<const __nv_bfloat16*>(down.data_ptr()),
        sorted_token.data_ptr<int>(), sorted_weight.data_ptr<float>(), offsets.data_ptr<int>(), y.data_ptr<float>(), D, I);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return y.to(torch::kBFloat16);
}
