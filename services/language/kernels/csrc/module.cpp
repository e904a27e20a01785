// The CPU kernels' Python module (built by services/language/kernels/cpu_ext.py).
#include <torch/extension.h>

torch::Tensor fused_moe(torch::Tensor x, torch::Tensor w13, torch::Tensor w2,
                        torch::Tensor topk_w, torch::Tensor topk_ids, bool dpbf16);
torch::Tensor paged_attention_rows(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                  torch::Tensor slots, torch::Tensor lens, torch::Tensor seq,
                                  double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_moe", &fused_moe, "fused MoE experts over packed weights (fp32 / bf16)");
  m.def("paged_attention_rows", &paged_attention_rows,
        "attention of query rows (decode or prefill tokens) over the paged cache");
}
