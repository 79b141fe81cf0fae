// Canvas attention: the 256 canvas queries attend bidirectionally to [cached prefix ; canvas].
//
// Build: JIT-compiled by cuda_kernels/__init__.py (torch.utils.cpp_extension.load); sm_80+.
//
// Math (the reference is attention.canvas_attention, the plain path):
//   out[b, h] = softmax(q[b, h] K^T) V,  scale 1.0 (the q/k RMSNorms replace 1/sqrt(d)),
//   K = [k_cache[b, g] ; k_new[b, g]], V likewise, with g = h / (H / Hkv) (grouped-query heads),
//   keys of padding (valid[b, p] == false) are left out. Sliding layers need nothing special:
//   their cache already holds only the last sliding_window - 1 tokens, as on the plain path.
//   head_dim 256 (sliding layers, 8 kv heads) and 512 (full layers, 2 kv heads), any multiple of 16.
//
// Algorithm: flash attention (online softmax), named as in the paper:
//   one block per (Br = 16 queries Qi, head h, batch b); for each key/value block Kj, Vj of Bc = 32:
//     S = Qi Kj^T                      tensor cores (WMMA, fp32 accumulate)
//     m_new = max(m, rowmax(S)); P = exp(S - m_new); l = l * exp(m - m_new) + rowsum(P)
//     O = O * exp(m - m_new) + P Vj    P rounded to bf16 for the tensor cores, O in fp32
//   out = O / l.
// The prefix K/V are read in place: the canvas K/V are never concatenated to the cache.

// Only the ATen headers it needs (not torch/extension.h): a quarter of the compile time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <mma.h>

using namespace nvcuda;

namespace {

constexpr int Br = 16, Bc = 32, WARPS = 4, KPAD = 8, SPAD = 4;

struct Smem {  // offsets (bytes) into the dynamic shared memory for head_dim d
  int q, k, v, s, p, o, stats, total;
  __host__ __device__ explicit Smem(int d) {
    q = 0;                                        // Qi   [Br][d + KPAD] bf16
    k = q + Br * (d + KPAD) * 2;                  // Kj   [Bc][d + KPAD] bf16
    v = k + Bc * (d + KPAD) * 2;                  // Vj   [Bc][d + KPAD] bf16
    s = v + Bc * (d + KPAD) * 2;                  // S    [Br][Bc + SPAD] fp32
    p = s + Br * (Bc + SPAD) * 4;                 // P    [Br][Bc + KPAD] bf16
    o = p + Br * (Bc + KPAD) * 2;                 // O    [Br][d + SPAD] fp32
    stats = o + Br * (d + SPAD) * 4;              // m, l, alpha per row, fp32
    total = stats + 3 * Br * 4;
  }
};

// one key/value row: cache rows first, then the canvas rows
__device__ __forceinline__ const __nv_bfloat16* kv_row(const __nv_bfloat16* cache, const __nv_bfloat16* fresh,
                                                       int idx, int Tc, int d) {
  return idx < Tc ? cache + (int64_t)idx * d : fresh + (int64_t)(idx - Tc) * d;
}

__global__ void canvas_attention_kernel(const __nv_bfloat16* __restrict__ q,        // (B, H, C, d)
                                        const __nv_bfloat16* __restrict__ k_cache,  // (B, Hkv, Tc, d)
                                        const __nv_bfloat16* __restrict__ v_cache,
                                        const __nv_bfloat16* __restrict__ k_new,    // (B, Hkv, C, d)
                                        const __nv_bfloat16* __restrict__ v_new,
                                        const bool* __restrict__ valid,             // (B, Tc) or null
                                        __nv_bfloat16* __restrict__ out,            // (B, H, C, d)
                                        int H, int Hkv, int C, int Tc, int d) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Smem L(d);
  const int ld = d + KPAD;
  auto sQ = reinterpret_cast<__nv_bfloat16*>(smem + L.q);
  auto sK = reinterpret_cast<__nv_bfloat16*>(smem + L.k);
  auto sV = reinterpret_cast<__nv_bfloat16*>(smem + L.v);
  auto sS = reinterpret_cast<float*>(smem + L.s);
  auto sP = reinterpret_cast<__nv_bfloat16*>(smem + L.p);
  auto sO = reinterpret_cast<float*>(smem + L.o);
  float* row_m = reinterpret_cast<float*>(smem + L.stats);
  float* row_l = row_m + Br;
  float* row_alpha = row_l + Br;

  const int q0 = blockIdx.x * Br, h = blockIdx.y, b = blockIdx.z, g = h / (H / Hkv);
  const int warp = threadIdx.x / 32, T = Tc + C;
  const __nv_bfloat16* Q = q + (((int64_t)b * H + h) * C) * d;
  const __nv_bfloat16* Kc = k_cache + ((int64_t)b * Hkv + g) * Tc * d;
  const __nv_bfloat16* Vc = v_cache + ((int64_t)b * Hkv + g) * Tc * d;
  const __nv_bfloat16* Kn = k_new + ((int64_t)b * Hkv + g) * C * d;
  const __nv_bfloat16* Vn = v_new + ((int64_t)b * Hkv + g) * C * d;
  const bool* keep = valid ? valid + (int64_t)b * Tc : nullptr;

  // load Qi (rows past C are zero), clear O, m = -inf, l = 0
  for (int i = threadIdx.x; i < Br * d / 8; i += blockDim.x) {
    int r = i / (d / 8), c = (i % (d / 8)) * 8;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (q0 + r < C) val = *reinterpret_cast<const uint4*>(Q + (int64_t)(q0 + r) * d + c);
    *reinterpret_cast<uint4*>(sQ + r * ld + c) = val;
  }
  for (int i = threadIdx.x; i < Br * (d + SPAD); i += blockDim.x) sO[i] = 0.f;
  if (threadIdx.x < Br) { row_m[threadIdx.x] = -INFINITY; row_l[threadIdx.x] = 0.f; }

  for (int j0 = 0; j0 < T; j0 += Bc) {
    // load Kj, Vj (rows past T are zero)
    for (int i = threadIdx.x; i < Bc * d / 8; i += blockDim.x) {
      int r = i / (d / 8), c = (i % (d / 8)) * 8, idx = j0 + r;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
      if (idx < T) {
        kv = *reinterpret_cast<const uint4*>(kv_row(Kc, Kn, idx, Tc, d) + c);
        vv = *reinterpret_cast<const uint4*>(kv_row(Vc, Vn, idx, Tc, d) + c);
      }
      *reinterpret_cast<uint4*>(sK + r * ld + c) = kv;
      *reinterpret_cast<uint4*>(sV + r * ld + c) = vv;
    }
    __syncthreads();  // Qi, Kj, Vj and the statistics are in place

    // S = Qi Kj^T: warps 0 and 1 each compute one 16x16 block of the 16x32 scores
    if (warp < Bc / 16) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> s;
      wmma::fill_fragment(s, 0.f);
      for (int kk = 0; kk < d; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> bk;
        wmma::load_matrix_sync(a, sQ + kk, ld);
        wmma::load_matrix_sync(bk, sK + warp * 16 * ld + kk, ld);  // Kj^T as column-major
        wmma::mma_sync(s, a, bk, s);
      }
      wmma::store_matrix_sync(sS + warp * 16, s, Bc + SPAD, wmma::mem_row_major);
    }
    __syncthreads();  // S complete

    // online softmax, one thread per query row; masked keys get probability 0
    if (threadIdx.x < Br) {
      const int r = threadIdx.x;
      float m_old = row_m[r], m_new = m_old;
      for (int c = 0; c < Bc; ++c) {
        int idx = j0 + c;
        bool ok = idx < T && (idx >= Tc || keep == nullptr || keep[idx]);
        float sv = ok ? sS[r * (Bc + SPAD) + c] : -INFINITY;
        sS[r * (Bc + SPAD) + c] = sv;
        m_new = fmaxf(m_new, sv);
      }
      float alpha = m_new == -INFINITY ? 1.f : __expf(m_old - m_new);
      float sum = 0.f;
      for (int c = 0; c < Bc; ++c) {
        float pv = m_new == -INFINITY ? 0.f : __expf(sS[r * (Bc + SPAD) + c] - m_new);
        __nv_bfloat16 pb = __float2bfloat16(pv);
        sP[r * (Bc + KPAD) + c] = pb;
        sum += __bfloat162float(pb);  // l counts exactly what P V adds
      }
      row_m[r] = m_new;
      row_l[r] = row_l[r] * alpha + sum;
      row_alpha[r] = alpha;
    }
    __syncthreads();  // P and alpha ready

    // O = O * alpha + P Vj: the d/16 column blocks of O are shared out among the warps
    for (int i = threadIdx.x; i < Br * d; i += blockDim.x) {
      int r = i / d, c = i % d;
      sO[r * (d + SPAD) + c] *= row_alpha[r];
    }
    __syncthreads();
    for (int f = warp; f < d / 16; f += WARPS) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> o;
      wmma::load_matrix_sync(o, sO + f * 16, d + SPAD, wmma::mem_row_major);
      for (int kk = 0; kk < Bc; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> bv;
        wmma::load_matrix_sync(a, sP + kk, Bc + KPAD);
        wmma::load_matrix_sync(bv, sV + kk * ld + f * 16, ld);
        wmma::mma_sync(o, a, bv, o);
      }
      wmma::store_matrix_sync(sO + f * 16, o, d + SPAD, wmma::mem_row_major);
    }
    __syncthreads();  // O updated before the next Kj, Vj overwrite the tiles
  }

  // out = O / l
  for (int i = threadIdx.x; i < Br * d; i += blockDim.x) {
    int r = i / d, c = i % d;
    if (q0 + r < C)
      out[(((int64_t)b * H + h) * C + q0 + r) * d + c] = __float2bfloat16(sO[r * (d + SPAD) + c] / row_l[r]);
  }
}

}  // namespace

// q (B, H, C, d); k_cache, v_cache (B, Hkv, Tc, d) (Tc may be 0); k_new, v_new (B, Hkv, C, d), bf16;
// valid (B, Tc) bool or an empty tensor. Returns (B, H, C, d) bf16.
at::Tensor canvas_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor k_new, at::Tensor v_new,
                            at::Tensor valid) {
  for (const at::Tensor* t : {&q, &k_cache, &v_cache, &k_new, &v_new}) {
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->dim() == 4,
                "q/k/v must be contiguous 4-D CUDA bf16 tensors");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0 || t->numel() == 0, "q/k/v: 16-byte aligned");
  }
  const c10::cuda::CUDAGuard guard(q.device());
  const int B = q.size(0), H = q.size(1), C = q.size(2), d = q.size(3);
  const int Hkv = k_new.size(1), Tc = k_cache.size(2);
  TORCH_CHECK(d % 16 == 0 && d <= 512, "head_dim must be a multiple of 16, at most 512");
  TORCH_CHECK(H % Hkv == 0 && k_cache.sizes() == v_cache.sizes() && k_new.sizes() == v_new.sizes() &&
              k_cache.size(0) == B && k_new.size(0) == B && k_cache.size(1) == Hkv && k_new.size(2) == C &&
              k_cache.size(3) == d && k_new.size(3) == d, "shapes disagree: q (B, H, C, d), caches (B, Hkv, Tc, d)");
  const bool has_valid = valid.numel() > 0;
  if (has_valid)
    TORCH_CHECK(valid.scalar_type() == at::kBool && valid.size(0) == B && valid.size(1) == Tc, "valid: (B, Tc) bool");
  auto valid_c = has_valid ? valid.contiguous() : valid;
  auto out = at::empty_like(q);
  const Smem L(d);
  auto stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaFuncSetAttribute(canvas_attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L.total));
  dim3 grid((C + Br - 1) / Br, H, B);
  canvas_attention_kernel<<<grid, 32 * WARPS, L.total, stream>>>(
      reinterpret_cast<const __nv_bfloat16*>(q.data_ptr()), reinterpret_cast<const __nv_bfloat16*>(k_cache.data_ptr()),
      reinterpret_cast<const __nv_bfloat16*>(v_cache.data_ptr()), reinterpret_cast<const __nv_bfloat16*>(k_new.data_ptr()),
      reinterpret_cast<const __nv_bfloat16*>(v_new.data_ptr()), has_valid ? valid_c.data_ptr<bool>() : nullptr,
      reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), H, Hkv, C, Tc, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
