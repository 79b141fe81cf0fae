// RMSNorm in one kernel: the plain path's nine small ones (cast, square, mean, add, pow, two
// multiplies, cast) become one read and one write of each row. A layer runs eleven of them.
//
// Build: JIT-compiled with the other kernels by cuda_kernels/__init__.py.
//
// Math (the reference is attention.RMSNorm.forward), for each row x of D values, in fp32:
//   y = x * rsqrt(mean(x^2) + eps) * w        w: the weight, or 1 for the norms without one
// rounded once to the input's dtype (bf16). Only the order of the sum of squares differs.
//
// Algorithm: one warp per row; each lane reads 8 values (16 bytes) at a time, the sum of squares is
// reduced with warp shuffles, then each lane writes back its own values.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>

namespace {

constexpr int WARPS = 8;  // rows per block

__global__ void __launch_bounds__(32 * WARPS) rms_norm_kernel(const __nv_bfloat16* __restrict__ x,
                                                               const __nv_bfloat16* __restrict__ weight,  // or null
                                                               __nv_bfloat16* __restrict__ y, int64_t rows, int D,
                                                               float eps) {
  const int64_t row = (int64_t)blockIdx.x * WARPS + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // a whole warp leaves together: the shuffles below stay complete
  const __nv_bfloat16* xr = x + row * D;
  float ss = 0.f;
  for (int c = lane * 8; c < D; c += 32 * 8) {  // sum of squares, 8 values a load
    const uint4 v = *reinterpret_cast<const uint4*>(xr + c);
    const __nv_bfloat16* b = reinterpret_cast<const __nv_bfloat16*>(&v);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float f = __bfloat162float(b[j]);
      ss += f * f;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
  const float r = rsqrtf(ss / D + eps);
  for (int c = lane * 8; c < D; c += 32 * 8) {  // scale and write back (the row is in L1/L2 by now)
    const uint4 v = *reinterpret_cast<const uint4*>(xr + c);
    const __nv_bfloat16* b = reinterpret_cast<const __nv_bfloat16*>(&v);
    __align__(16) __nv_bfloat16 out[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float w = weight ? __bfloat162float(weight[c + j]) : 1.f;
      out[j] = __float2bfloat16(__bfloat162float(b[j]) * r * w);
    }
    *reinterpret_cast<uint4*>(y + row * D + c) = *reinterpret_cast<const uint4*>(out);
  }
}

}  // namespace

// x (..., D) contiguous CUDA bf16, D a multiple of 8; weight (D,) bf16 or an empty tensor.
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x: contiguous CUDA bf16");
  const int D = x.size(-1);
  TORCH_CHECK(D % 8 == 0, "the normalised size must be a multiple of 8");
  const bool has_weight = weight.numel() > 0;
  if (has_weight)
    TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() && weight.numel() == D,
                "weight: (D,) contiguous bf16");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  const int64_t rows = x.numel() / D;
  if (rows > 0) {
    rms_norm_kernel<<<(rows + WARPS - 1) / WARPS, 32 * WARPS, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()),
        has_weight ? reinterpret_cast<const __nv_bfloat16*>(weight.data_ptr()) : nullptr,
        reinterpret_cast<__nv_bfloat16*>(y.data_ptr()), rows, D, static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return y;
}
