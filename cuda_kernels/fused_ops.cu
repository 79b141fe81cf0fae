// The small steps between a layer's big kernels, fused: where the plain path launches one PyTorch op
// after another (a cast, a square, a mean, ... each a pass over memory and a launch), one kernel.
//
// Build: JIT-compiled with the other kernels by cuda_kernels/__init__.py.
//
// Math (N is attention.RMSNorm: x * rsqrt(mean(x^2) + eps) * w in fp32, rounded to bf16):
//   post_ffn      h' = (h + N(N1(dense) + N2(routed))) * layer_scalar     model.Block.combine
//   qk_norm_rope  y = RoPE(N(x)) for each head of q or k                   attention.Attention.qkv
//                   RoPE(n) = n * cos + rotate_half(n) * sin, half-split pairs (i, i + d/2)
//   softcap       logits = tanh(x * fl(1/cap)) * cap, bf16 in, fp32 out  model.DiffusionGemma.logits (x / cap on CUDA)
//   router_tail   p = softmax(logits) in fp32; the top k of p, largest first (ties: the lower
//                 expert); w = p_top / sum(p_top) * per_expert_scale[top]  moe.Router.forward
// Every intermediate is rounded to bf16 exactly where the plain path rounds it (each PyTorch bf16 op
// computes in fp32 and rounds its result), so what differs from the plain path is only the order of
// the sums (of squares, of the softmax) and rsqrt's last bit, as in rmsnorm.cu; and which of two
// experts with the same probability comes first.
//
// Algorithms: post_ffn, one block per row, each thread 8 consecutive values, three block reductions
// (the two inner norms together, then the outer); qk_norm_rope, one warp per head row, each lane 8
// values of the first half and their 8 partners of the second; softcap, 8 values per thread;
// router_tail, one warp per token: each lane holds E/32 probabilities, k rounds of a warp arg-max.

#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>

namespace {

using bf16 = __nv_bfloat16;

__device__ __forceinline__ float rnd(float x) { return __bfloat162float(__float2bfloat16(x)); }  // as a bf16 op

__device__ __forceinline__ void load8(const bf16* p, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const bf16* b = reinterpret_cast<const bf16*>(&v);
#pragma unroll
  for (int j = 0; j < 8; ++j) out[j] = __bfloat162float(b[j]);
}

__device__ __forceinline__ void store8(bf16* p, const float* in) {
  __align__(16) bf16 out[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) out[j] = __float2bfloat16(in[j]);
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(out);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

// The sum of v over the block, returned to every thread (every thread of the block must call it).
__device__ float block_sum(float v, float* part) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = (blockDim.x + 31) / 32;
  __syncthreads();  // `part` may still be read from the previous call
  if (lane == 0) part[warp] = v;
  __syncthreads();
  return warp_sum(lane < warps ? part[lane] : 0.f);
}

__global__ void post_ffn_kernel(const bf16* __restrict__ h, const bf16* __restrict__ dense,
                                const bf16* __restrict__ routed, const bf16* __restrict__ w1,
                                const bf16* __restrict__ w2, const bf16* __restrict__ w,
                                const bf16* __restrict__ scalar, bf16* __restrict__ out, int D, float eps) {
  __shared__ float part[32];
  const int64_t base = (int64_t)blockIdx.x * D;
  const int c = threadIdx.x * 8;
  const bool on = c < D;  // threads past the row still take part in the reductions
  float d[8] = {0}, r[8] = {0}, s[8] = {0};
  float sd = 0.f, sr = 0.f, ss = 0.f;
  if (on) {
    load8(dense + base + c, d);
    load8(routed + base + c, r);
#pragma unroll
    for (int j = 0; j < 8; ++j) sd += d[j] * d[j], sr += r[j] * r[j];
  }
  const float kd = rsqrtf(block_sum(sd, part) / D + eps);
  const float kr = rsqrtf(block_sum(sr, part) / D + eps);
  if (on) {
    float a[8], b[8];
    load8(w1 + c, a);
    load8(w2 + c, b);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      s[j] = rnd(rnd(d[j] * kd * a[j]) + rnd(r[j] * kr * b[j]));  // N1(dense) + N2(routed), in bf16
      ss += s[j] * s[j];
    }
  }
  const float ks = rsqrtf(block_sum(ss, part) / D + eps);
  if (on) {
    float x[8], g[8], y[8];
    load8(h + base + c, x);
    load8(w + c, g);
    const float k = __bfloat162float(scalar[0]);
#pragma unroll
    for (int j = 0; j < 8; ++j) y[j] = rnd(x[j] + rnd(s[j] * ks * g[j])) * k;
    store8(out + base + c, y);
  }
}

constexpr int WARPS = 8;  // head rows per block of qk_norm_rope

__global__ void __launch_bounds__(32 * WARPS)
    qk_norm_rope_kernel(const bf16* __restrict__ x, const bf16* __restrict__ w, const bf16* __restrict__ cos,
                        const bf16* __restrict__ sin, bf16* __restrict__ y, int64_t rows, int S, int H, int d,
                        float eps) {
  const int64_t row = (int64_t)blockIdx.x * WARPS + threadIdx.x / 32;  // (b, s, head) flattened
  const int lane = threadIdx.x % 32, half = d / 2;
  if (row >= rows) return;  // a whole warp leaves together
  const bf16* xr = x + row * d;
  const int64_t pos = (row / H) % S;
  const bf16 *cr = cos + pos * d, *sr = sin + pos * d;
  float ss = 0.f;
  for (int c = lane * 8; c < half; c += 32 * 8) {
    float lo[8], hi[8];
    load8(xr + c, lo);
    load8(xr + c + half, hi);
#pragma unroll
    for (int j = 0; j < 8; ++j) ss += lo[j] * lo[j] + hi[j] * hi[j];
  }
  const float k = rsqrtf(warp_sum(ss) / d + eps);
  for (int c = lane * 8; c < half; c += 32 * 8) {
    float lo[8], hi[8], wl[8], wh[8], cl[8], ch[8], sl[8], sh[8], ol[8], oh[8];
    load8(xr + c, lo), load8(xr + c + half, hi);
    load8(w + c, wl), load8(w + c + half, wh);
    load8(cr + c, cl), load8(cr + c + half, ch);
    load8(sr + c, sl), load8(sr + c + half, sh);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float nl = rnd(lo[j] * k * wl[j]), nh = rnd(hi[j] * k * wh[j]);  // the norm, in bf16
      ol[j] = rnd(nl * cl[j]) + rnd(-nh * sl[j]);  // rotate_half: (-x2, x1)
      oh[j] = rnd(nh * ch[j]) + rnd(nl * sh[j]);
    }
    store8(y + row * d + c, ol);
    store8(y + row * d + c + half, oh);
  }
}

// inv = fl(1 / cap), computed on the host: PyTorch on CUDA divides by a scalar as a multiplication by
// its reciprocal, so x * inv (not x / cap) gives its bits
__global__ void softcap_kernel(const bf16* __restrict__ x, float* __restrict__ y, int64_t n8, float cap, float inv) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += (int64_t)gridDim.x * blockDim.x) {
    float v[8];
    load8(x + i * 8, v);
    float4 a, b;
    a.x = tanhf(v[0] * inv) * cap, a.y = tanhf(v[1] * inv) * cap, a.z = tanhf(v[2] * inv) * cap;
    a.w = tanhf(v[3] * inv) * cap, b.x = tanhf(v[4] * inv) * cap, b.y = tanhf(v[5] * inv) * cap;
    b.z = tanhf(v[6] * inv) * cap, b.w = tanhf(v[7] * inv) * cap;
    reinterpret_cast<float4*>(y)[2 * i] = a;
    reinterpret_cast<float4*>(y)[2 * i + 1] = b;
  }
}

constexpr int MAX_PER_LANE = 8;  // router_tail: up to 256 experts

__global__ void __launch_bounds__(32 * WARPS)
    router_tail_kernel(const bf16* __restrict__ logits, const bf16* __restrict__ expert_scale,
                       float* __restrict__ weights, int64_t* __restrict__ idx, int64_t T, int E, int K) {
  const int64_t t = (int64_t)blockIdx.x * WARPS + threadIdx.x / 32;
  const int lane = threadIdx.x % 32, per = (E + 31) / 32;
  if (t >= T) return;  // a whole warp leaves together
  float p[MAX_PER_LANE];
  float m = -INFINITY;
  for (int j = 0; j < per; ++j) {  // expert lane + 32 j (none past E)
    const int e = lane + 32 * j;
    p[j] = e < E ? __bfloat162float(logits[t * E + e]) : -INFINITY;
    m = fmaxf(m, p[j]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
  float sum = 0.f;
  for (int j = 0; j < per; ++j) sum += lane + 32 * j < E ? expf(p[j] - m) : 0.f;
  sum = warp_sum(sum);
  for (int j = 0; j < per; ++j)  // the softmax, in fp32; -1 past E: never picked
    p[j] = lane + 32 * j < E ? expf(p[j] - m) / sum : -1.f;
  float picked = 0.f, mine[MAX_PER_LANE];
  int mine_e[MAX_PER_LANE];
  for (int k = 0; k < K; ++k) {
    float best = -1.f;
    int best_e = E;
    for (int j = 0; j < per; ++j) {
      const int e = lane + 32 * j;
      if (p[j] > best || (p[j] == best && e < best_e)) best = p[j], best_e = e;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {  // the warp's largest, the lower expert on a tie
      const float ob = __shfl_xor_sync(0xffffffff, best, o);
      const int oe = __shfl_xor_sync(0xffffffff, best_e, o);
      if (ob > best || (ob == best && oe < best_e)) best = ob, best_e = oe;
    }
    if (best_e < E && best_e % 32 == lane) p[best_e / 32] = -2.f;  // taken: below every probability
    // NaN logits match no comparison and leave best_e at E: a valid id instead (a row's NaN input
    // reaches the logits anyway, and the sampler stops there with its clean error), never a read
    // of expert_scale[E] or an out-of-range id
    if (best_e >= E) best_e = E - 1;
    if (k < MAX_PER_LANE) mine[k] = best, mine_e[k] = best_e;
    picked += best;
  }
  if (lane == 0) {
    for (int k = 0; k < K; ++k) {
      weights[t * K + k] = mine[k] / picked * __bfloat162float(expert_scale[mine_e[k]]);
      idx[t * K + k] = mine_e[k];
    }
  }
}

void check_bf16(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kBFloat16 && t.is_contiguous(), name, ": contiguous CUDA bf16");
}

}  // namespace

// h, dense, routed (..., D) bf16, D a multiple of 8 up to 8192; w1, w2, w (D,); scalar (1,).
at::Tensor post_ffn(at::Tensor h, at::Tensor dense, at::Tensor routed, at::Tensor w1, at::Tensor w2, at::Tensor w,
                    at::Tensor scalar, double eps) {
  for (auto* t : {&h, &dense, &routed, &w1, &w2, &w, &scalar}) check_bf16(*t, "post_ffn's tensors");
  const int D = h.size(-1);
  TORCH_CHECK(D % 8 == 0 && D <= 8192, "post_ffn: the hidden size must be a multiple of 8, at most 8192");
  TORCH_CHECK(dense.sizes() == h.sizes() && routed.sizes() == h.sizes() && w1.numel() == D && w2.numel() == D &&
                  w.numel() == D && scalar.numel() == 1,
              "post_ffn: h, dense and routed of one shape, (D,) weights, one scalar");
  const c10::cuda::CUDAGuard guard(h.device());
  auto out = at::empty_like(h);
  const int64_t rows = h.numel() / D;
  const int threads = ((D / 8 + 31) / 32) * 32;
  if (rows > 0) {
    post_ffn_kernel<<<rows, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const bf16*>(h.data_ptr()), reinterpret_cast<const bf16*>(dense.data_ptr()),
        reinterpret_cast<const bf16*>(routed.data_ptr()), reinterpret_cast<const bf16*>(w1.data_ptr()),
        reinterpret_cast<const bf16*>(w2.data_ptr()), reinterpret_cast<const bf16*>(w.data_ptr()),
        reinterpret_cast<const bf16*>(scalar.data_ptr()), reinterpret_cast<bf16*>(out.data_ptr()), D,
        static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

// x (B, S, H, d) bf16, d a multiple of 16; w (d,); cos, sin (S, d) -> (B, S, H, d).
at::Tensor qk_norm_rope(at::Tensor x, at::Tensor w, at::Tensor cos, at::Tensor sin, double eps) {
  for (auto* t : {&x, &w, &cos, &sin}) check_bf16(*t, "qk_norm_rope's tensors");
  TORCH_CHECK(x.dim() == 4, "qk_norm_rope: x (B, S, H, d)");
  const int S = x.size(1), H = x.size(2), d = x.size(3);
  TORCH_CHECK(d % 16 == 0, "qk_norm_rope: head_dim must be a multiple of 16");
  TORCH_CHECK(w.numel() == d && cos.numel() == (int64_t)S * d && sin.numel() == (int64_t)S * d,
              "qk_norm_rope: w (d,), cos and sin (S, d)");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  const int64_t rows = x.numel() / d;
  if (rows > 0) {
    qk_norm_rope_kernel<<<(rows + WARPS - 1) / WARPS, 32 * WARPS, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const bf16*>(x.data_ptr()), reinterpret_cast<const bf16*>(w.data_ptr()),
        reinterpret_cast<const bf16*>(cos.data_ptr()), reinterpret_cast<const bf16*>(sin.data_ptr()),
        reinterpret_cast<bf16*>(y.data_ptr()), rows, S, H, d, static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return y;
}

// x (..., V) bf16, its size a multiple of 8 -> fp32 of the same shape.
at::Tensor softcap(at::Tensor x, double cap) {
  check_bf16(x, "softcap's input");
  TORCH_CHECK(x.numel() % 8 == 0, "softcap: the number of logits must be a multiple of 8");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  const int64_t n8 = x.numel() / 8;
  if (n8 > 0) {
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((n8 + threads - 1) / threads, 65535);
    softcap_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const bf16*>(x.data_ptr()), y.data_ptr<float>(), n8, static_cast<float>(cap),
        1.0f / static_cast<float>(cap));  // the reciprocal as PyTorch takes it: in fp32
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return y;
}

// logits (T, E) bf16, E up to 256; expert_scale (E,) bf16; k <= 8 ->
// weights (T, k) fp32 and expert ids (T, k) int64, as moe.Router.forward returns them.
std::vector<at::Tensor> router_tail(at::Tensor logits, at::Tensor expert_scale, int64_t k) {
  check_bf16(logits, "router_tail's logits");
  check_bf16(expert_scale, "router_tail's per-expert scale");
  const int64_t T = logits.size(0);
  const int E = logits.size(1);
  TORCH_CHECK(logits.dim() == 2 && E <= 32 * MAX_PER_LANE && expert_scale.numel() == E,
              "router_tail: logits (T, E), E up to 256, one scale per expert");
  TORCH_CHECK(k >= 1 && k <= MAX_PER_LANE && k <= E, "router_tail: 1 <= k <= 8");
  const c10::cuda::CUDAGuard guard(logits.device());
  auto weights = at::empty({T, k}, logits.options().dtype(at::kFloat));
  auto idx = at::empty({T, k}, logits.options().dtype(at::kLong));
  if (T > 0) {
    router_tail_kernel<<<(T + WARPS - 1) / WARPS, 32 * WARPS, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const bf16*>(logits.data_ptr()), reinterpret_cast<const bf16*>(expert_scale.data_ptr()),
        weights.data_ptr<float>(), idx.data_ptr<int64_t>(), T, E, static_cast<int>(k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {weights, idx};
}
