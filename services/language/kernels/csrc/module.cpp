// The CPU kernels' Python module (built by services/language/kernels/cpu_ext.py).
#include <torch/extension.h>

torch::Tensor fused_moe(torch::Tensor x, torch::Tensor w13, torch::Tensor w2,
                        torch::Tensor topk_w, torch::Tensor topk_ids, bool dpbf16);
torch::Tensor paged_attention_rows(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                  torch::Tensor slots, torch::Tensor lens, torch::Tensor seq,
                                  double scale);

std::vector<torch::Tensor> rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual,
                                    torch::Tensor weight, double eps);
std::vector<torch::Tensor> qk_norm_rope(torch::Tensor q, torch::Tensor k, torch::Tensor q_weight,
                                        torch::Tensor k_weight, torch::Tensor cos,
                                        torch::Tensor sin, int64_t hq, int64_t hkv, double eps);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_moe", &fused_moe, "fused MoE experts over packed weights (fp32 / bf16)");
  m.def("paged_attention_rows", &paged_attention_rows,
        "attention of query rows (decode or prefill tokens) over the paged cache");
  m.def("rms_norm", &rms_norm, "RMSNorm of rows, optionally of residual + x");
  m.def("qk_norm_rope", &qk_norm_rope, "per-head q/k RMSNorm and rotary embedding");
}
