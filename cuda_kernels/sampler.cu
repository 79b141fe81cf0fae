// The sampler's pass over the logits, fused: one read of each row of the canvas's logits gives the
// temperature-scaled logits for self-conditioning (bf16), the argmax, the entropy, a sample, and the
// renoise token of the position.
//
// Build: JIT-compiled with the other kernels by cuda_kernels/__init__.py.
//
// Math (the reference is sampler.logit_stats, the plain path), for row r of V logits:
//   x_i = raw_i / T                                T: the step's temperature (a device scalar); a true
//                                                  division, as torch divides by a device tensor
//   m = max x;  s = sum exp(x_i - m);  t = sum exp(x_i - m) x_i
//   entropy = (m + log s) - t / s                  = -sum p_i log p_i with p = softmax(x)
//   argmax  = the first i with x_i = m             (as torch.argmax)
//   sample  = argmax_i (x_i - log(-log u_i))       Gumbel-max: distributed as softmax(x)
//   sc[r, i] = bf16(x_i)
//   noise    = a uniformly random token id in [0, V)  (the renoise draw of sampler.logit_stats)
// u_i comes from a counter-based generator (Philox 4x32-10, key = keys[r / C], one 64-bit key per
// canvas row drawn by sampler.RandomStreams, counter = (i / 4, r, 0)), u = (23 bits + 0.5) / 2^23,
// strictly inside (0, 1); the noise token from counter (0, r, 0, 1). The pass needs no state, so a
// CUDA graph replays it with new keys. The plain path samples with torch.multinomial: the two
// draw different random streams.
//
// Algorithm: one block per row; each thread walks the row with a stride of the block, keeping
// (m, s, t), the argmax and the best Gumbel score; then a warp-shuffle and shared-memory reduction
// merges the partial states: (m1, s1, t1) + (m2, s2, t2) = (m, s1 e^(m1-m) + s2 e^(m2-m), likewise t).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>

#include <vector>

namespace {

constexpr int THREADS = 1024;

// Philox 4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): ten rounds
// of two 32x32 -> 64-bit multiplies mixing a 128-bit counter under a 64-bit key; four 32-bit outputs.
__device__ __forceinline__ uint4 philox(uint4 c, uint2 k) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(M0, c.x), lo0 = M0 * c.x;
    const uint32_t hi1 = __umulhi(M1, c.z), lo1 = M1 * c.z;
    c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    k.x += W0;
    k.y += W1;
  }
  return c;
}

struct State {
  float m, s, t;     // running max, sum of exp(x - m), sum of exp(x - m) * x
  float best;        // largest x seen (argmax)
  int64_t arg;
  float gumbel;      // largest x + Gumbel noise (the sample)
  int64_t pick;
};

// A uniform in (0, 1) from 32 random bits (see the call).
__device__ __forceinline__ float uniform(uint32_t bits) {
  return (static_cast<float>(bits >> 9) + 0.5f) * (1.f / 8388608.f);
}

__device__ __forceinline__ void add(State& a, float x, int64_t i, float u) {
  if (x == -INFINITY) return;  // probability 0: adds nothing (and 0 * -inf would be NaN)
  if (x > a.m) {  // rescale the sums to the new maximum
    const float f = __expf(a.m - x);
    a.s = a.s * f + 1.f;
    a.t = a.t * f + x;
    a.m = x;
  } else {
    const float e = __expf(x - a.m);
    a.s += e;
    a.t += e * x;
  }
  if (x > a.best) { a.best = x; a.arg = i; }  // strictly greater: the first maximum stays
  const float g = x - logf(-logf(u));  // full-precision logs: __logf is coarse near u = 1
  if (g > a.gumbel) { a.gumbel = g; a.pick = i; }
}

__device__ __forceinline__ void merge(State& a, const State& b) {
  const float m = fmaxf(a.m, b.m);
  const float fa = a.m == -INFINITY ? 0.f : __expf(a.m - m), fb = b.m == -INFINITY ? 0.f : __expf(b.m - m);
  a.s = a.s * fa + b.s * fb;
  a.t = a.t * fa + b.t * fb;
  a.m = m;
  if (b.best > a.best || (b.best == a.best && b.arg < a.arg)) { a.best = b.best; a.arg = b.arg; }
  if (b.gumbel > a.gumbel || (b.gumbel == a.gumbel && b.pick < a.pick)) { a.gumbel = b.gumbel; a.pick = b.pick; }
}

__device__ __forceinline__ State shuffle(const State& a, int lane) {
  State b;
  b.m = __shfl_xor_sync(0xffffffff, a.m, lane);
  b.s = __shfl_xor_sync(0xffffffff, a.s, lane);
  b.t = __shfl_xor_sync(0xffffffff, a.t, lane);
  b.best = __shfl_xor_sync(0xffffffff, a.best, lane);
  b.arg = __shfl_xor_sync(0xffffffff, a.arg, lane);
  b.gumbel = __shfl_xor_sync(0xffffffff, a.gumbel, lane);
  b.pick = __shfl_xor_sync(0xffffffff, a.pick, lane);
  return b;
}

__global__ void __launch_bounds__(THREADS) sampler_kernel(const float* __restrict__ raw,          // (R, V)
                                                          const float* __restrict__ temperature,  // ()
                                                          const int64_t* __restrict__ keys,       // (R / C,)
                                                          __nv_bfloat16* __restrict__ sc,         // (R, V)
                                                          int64_t* __restrict__ argmax,           // (R,)
                                                          int64_t* __restrict__ sample,           // (R,)
                                                          float* __restrict__ entropy,            // (R,)
                                                          int64_t* __restrict__ noise,            // (R,)
                                                          int64_t V, int64_t C) {
  const int64_t r = blockIdx.x;
  const float t = *temperature;
  const int64_t key = keys[r / C];
  const uint2 k = make_uint2(static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
  const float* row = raw + r * V;
  __nv_bfloat16* out = sc + r * V;
  State a{-INFINITY, 0.f, 0.f, -INFINITY, 0, -INFINITY, 0};
  // 4 logits a step: one float4 load, one Philox call (4 uniforms), one 8-byte store
  for (int64_t j = threadIdx.x; j < V / 4; j += THREADS) {
    const float4 v = reinterpret_cast<const float4*>(row)[j];
    const uint4 bits = philox(make_uint4(static_cast<uint32_t>(j), static_cast<uint32_t>(r),
                                         static_cast<uint32_t>(j >> 32), 0u), k);
    const float x[4] = {v.x / t, v.y / t, v.z / t, v.w / t};
    const uint32_t u[4] = {bits.x, bits.y, bits.z, bits.w};
    __align__(8) __nv_bfloat16 b[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      b[q] = __float2bfloat16(x[q]);
      // 23 random bits, centred: n + 0.5 needs 24 bits, so (n + 0.5) / 2^23 is exact in fp32 and lies
      // in [2^-24, 1 - 2^-24] (with 24 bits, n = 2^24 - 1 would round up to exactly 1: log(-log 1) = -inf)
      add(a, x[q], 4 * j + q, uniform(u[q]));
    }
    reinterpret_cast<uint2*>(out)[j] = *reinterpret_cast<const uint2*>(b);
  }
  // reduce: within each warp, then across the warps through shared memory
  for (int lane = 16; lane > 0; lane >>= 1) {
    const State b = shuffle(a, lane);
    merge(a, b);
  }
  __shared__ State partial[THREADS / 32];
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = a;
  __syncthreads();  // every warp's partial state is written
  if (threadIdx.x < 32) {
    a = threadIdx.x < THREADS / 32 ? partial[threadIdx.x] : State{-INFINITY, 0.f, 0.f, -INFINITY, 0, -INFINITY, 0};
    for (int lane = 16; lane > 0; lane >>= 1) {
      const State b = shuffle(a, lane);
      merge(a, b);
    }
    if (threadIdx.x == 0) {
      argmax[r] = a.arg;
      sample[r] = a.pick;
      entropy[r] = (a.m + logf(a.s)) - a.t / a.s;
      // the renoise token: 32 random bits scaled to [0, V) (exact for V a power of two)
      const uint4 bits = philox(make_uint4(0u, static_cast<uint32_t>(r), 0u, 1u), k);
      noise[r] = static_cast<int64_t>((static_cast<uint64_t>(bits.x) * static_cast<uint64_t>(V)) >> 32);
    }
  }
}

}  // namespace

// raw (R, V) fp32 contiguous, V a multiple of 4; temperature () fp32 and keys (R / C,) int64 on the
// same device (read when the kernel runs: a CUDA graph may change them between replays); C rows a key.
// Returns (sc (R, V) bf16, argmax (R,) int64, sample (R,) int64, entropy (R,) fp32, noise (R,) int64).
std::vector<at::Tensor> sampler_stats(at::Tensor raw, at::Tensor temperature, at::Tensor keys, int64_t C) {
  TORCH_CHECK(raw.is_cuda() && raw.scalar_type() == at::kFloat && raw.is_contiguous() && raw.dim() == 2,
              "raw: contiguous (R, V) CUDA fp32");
  TORCH_CHECK(raw.size(1) % 4 == 0, "V must be a multiple of 4");
  TORCH_CHECK(temperature.scalar_type() == at::kFloat && temperature.numel() == 1 && temperature.device() == raw.device(),
              "temperature: one fp32 on the logits' device");
  TORCH_CHECK(C > 0 && raw.size(0) % C == 0, "the rows must be whole canvases of C");
  TORCH_CHECK(keys.scalar_type() == at::kLong && keys.is_contiguous() && keys.numel() == raw.size(0) / C &&
              keys.device() == raw.device(), "keys: one int64 per canvas row, on the logits' device");
  const c10::cuda::CUDAGuard guard(raw.device());
  const int64_t R = raw.size(0), V = raw.size(1);
  auto sc = at::empty({R, V}, raw.options().dtype(at::kBFloat16));
  auto argmax = at::empty({R}, raw.options().dtype(at::kLong));
  auto sample = at::empty({R}, raw.options().dtype(at::kLong));
  auto entropy = at::empty({R}, raw.options());
  auto noise = at::empty({R}, raw.options().dtype(at::kLong));
  if (R > 0) {
    sampler_kernel<<<R, THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(
        raw.data_ptr<float>(), temperature.data_ptr<float>(), keys.data_ptr<int64_t>(),
        reinterpret_cast<__nv_bfloat16*>(sc.data_ptr()), argmax.data_ptr<int64_t>(), sample.data_ptr<int64_t>(),
        entropy.data_ptr<float>(), noise.data_ptr<int64_t>(), V, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {sc, argmax, sample, entropy, noise};
}
