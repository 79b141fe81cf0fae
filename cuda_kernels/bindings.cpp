// Python bindings of the CUDA kernels (built together by cuda_kernels/__init__.py).
#include <torch/extension.h>

at::Tensor fused_moe(at::Tensor x, at::Tensor sorted_token, at::Tensor sorted_assign, at::Tensor sorted_weight,
                     at::Tensor offsets, at::Tensor gate_up, at::Tensor gate_up_scale, at::Tensor gate_up_zero,
                     at::Tensor down, at::Tensor down_scale, at::Tensor down_zero, int64_t fmt, int64_t group,
                     int64_t I);
at::Tensor canvas_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor k_new, at::Tensor v_new,
                            at::Tensor valid);
std::vector<at::Tensor> sampler_stats(at::Tensor raw, at::Tensor temperature, at::Tensor keys, int64_t C);
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps);
at::Tensor post_ffn(at::Tensor h, at::Tensor dense, at::Tensor routed, at::Tensor w1, at::Tensor w2, at::Tensor w,
                    at::Tensor scalar, double eps);
at::Tensor qk_norm_rope(at::Tensor x, at::Tensor w, at::Tensor cos, at::Tensor sin, double eps);
at::Tensor softcap(at::Tensor x, double cap);
std::vector<at::Tensor> router_tail(at::Tensor logits, at::Tensor expert_scale, int64_t k);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_moe", &fused_moe, "grouped expert MLP over assignments sorted by expert (fused_moe.cu)");
  m.def("canvas_attention", &canvas_attention, "bidirectional canvas attention over [cache ; canvas] (attention.cu)");
  m.def("sampler_stats", &sampler_stats, "scaled logits, argmax, entropy, a sample and a renoise token in one pass (sampler.cu)");
  m.def("rms_norm", &rms_norm, "RMSNorm in one pass (rmsnorm.cu)");
  m.def("post_ffn", &post_ffn, "a layer's end: three norms, two adds, the layer scalar (fused_ops.cu)");
  m.def("qk_norm_rope", &qk_norm_rope, "a head's RMSNorm and RoPE (fused_ops.cu)");
  m.def("router_tail", &router_tail, "the router's softmax, top-k, renormalisation and per-expert scale (fused_ops.cu)");
  m.def("softcap", &softcap, "the head's tanh softcap, bf16 in, fp32 out (fused_ops.cu)");
}
