// Python bindings of the CUDA kernels (built together by cuda_kernels/__init__.py).
#include <torch/extension.h>

torch::Tensor fused_moe(torch::Tensor x, torch::Tensor sorted_token, torch::Tensor sorted_weight, torch::Tensor offsets,
                        torch::Tensor gate_up, torch::Tensor gate_up_scale, torch::Tensor gate_up_zero,
                        torch::Tensor down, torch::Tensor down_scale, torch::Tensor down_zero,
                        int64_t fmt, int64_t group, int64_t I);
torch::Tensor canvas_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k_new,
                               torch::Tensor v_new, torch::Tensor valid);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_moe", &fused_moe, "grouped expert MLP over tokens sorted by expert (fused_moe.cu)");
  m.def("canvas_attention", &canvas_attention, "bidirectional canvas attention over [cache ; canvas] (attention.cu)");
}
