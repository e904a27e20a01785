// Decode attention over the paged KV cache, read in place (no gathered copy of the context), as
// vLLM's CPU backend does (vllm/v1/attention/backends/cpu_attn.py): one new token per sequence.
//
//   q        [B, Hq, hd]        the decode rows' queries (fp32 or bf16)
//   k, v     [slots, Hkv, hd]   one layer's cache (same dtype)
//   slots    [B, L] int64       slot of token t of sequence b (rows padded past their length)
//   lens     [B] int64          tokens of each sequence, the new one included
//   -> out   [B, Hq, hd]
//
// Work items are (sequence, KV head): the Hq/Hkv query heads that share a KV head read each key
// and value once. Keys are taken in blocks of 32 tokens: the block's scores for every query head,
// then an online-softmax update of fp32 accumulators, so a long context never needs a buffer.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

inline float as_f(float v) { return v; }
inline float as_f(c10::BFloat16 v) { return static_cast<float>(v); }

constexpr int TB = 32;  // tokens per block

template <typename T>
void decode_impl(const T* q, const T* k, const T* v, const int64_t* slots, const int64_t* lens,
                 T* out, int B, int Hq, int Hkv, int hd, int L, float scale) {
  const int g = Hq / Hkv;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> qf(g * hd), acc(g * hd), s(g * TB), m(g), l(g), kf(TB * hd), vf(hd);
#pragma omp for schedule(dynamic, 1)
    for (int item = 0; item < B * Hkv; ++item) {
      const int b = item / Hkv, h = item % Hkv;
      const int n = static_cast<int>(lens[b]);
      for (int i = 0; i < g; ++i) {
        const T* qp = q + ((int64_t)b * Hq + h * g + i) * hd;
        for (int d = 0; d < hd; ++d) qf[i * hd + d] = as_f(qp[d]) * scale;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      for (int t0 = 0; t0 < n; t0 += TB) {
        const int tb = std::min(TB, n - t0);
        for (int j = 0; j < tb; ++j) {
          const T* kp = k + (slots[(int64_t)b * L + t0 + j] * Hkv + h) * hd;
          for (int d = 0; d < hd; ++d) kf[j * hd + d] = as_f(kp[d]);
        }
        for (int i = 0; i < g; ++i) {
          float block_max = m[i];
          for (int j = 0; j < tb; ++j) {
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int d = 0; d < hd; ++d) dot += qf[i * hd + d] * kf[j * hd + d];
            s[i * TB + j] = dot;
            block_max = std::max(block_max, dot);
          }
          const float corr = std::exp(m[i] - block_max);  // 0 on the first block
          l[i] *= corr;
          for (int d = 0; d < hd; ++d) acc[i * hd + d] *= corr;
          m[i] = block_max;
          for (int j = 0; j < tb; ++j) {
            s[i * TB + j] = std::exp(s[i * TB + j] - block_max);
            l[i] += s[i * TB + j];
          }
        }
        for (int j = 0; j < tb; ++j) {
          const T* vp = v + (slots[(int64_t)b * L + t0 + j] * Hkv + h) * hd;
          for (int d = 0; d < hd; ++d) vf[d] = as_f(vp[d]);
          for (int i = 0; i < g; ++i) {
            const float p = s[i * TB + j];
#pragma omp simd
            for (int d = 0; d < hd; ++d) acc[i * hd + d] += p * vf[d];
          }
        }
      }
      for (int i = 0; i < g; ++i) {
        T* op = out + ((int64_t)b * Hq + h * g + i) * hd;
        const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
        for (int d = 0; d < hd; ++d) op[d] = static_cast<T>(acc[i * hd + d] * inv);
      }
    }
  }
}

}  // namespace

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               torch::Tensor slots, torch::Tensor lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q [B, Hq, hd], k/v [S, Hkv, hd]");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous(), "the cache must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "q, k and v share a dtype");
  const int B = q.size(0), Hq = q.size(1), hd = q.size(2), Hkv = k.size(1);
  TORCH_CHECK(Hq % Hkv == 0 && k.size(2) == hd, "GQA shapes");
  auto qc = q.contiguous();
  auto sl = slots.to(torch::kInt64).contiguous();
  auto ln = lens.to(torch::kInt64).contiguous();
  TORCH_CHECK(sl.dim() == 2 && sl.size(0) == B && ln.numel() == B, "slots [B, L], lens [B]");
  auto out = torch::empty_like(qc);
  const int L = sl.size(1);
  if (q.scalar_type() == torch::kFloat32) {
    decode_impl<float>(qc.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                       sl.data_ptr<int64_t>(), ln.data_ptr<int64_t>(), out.data_ptr<float>(), B,
                       Hq, Hkv, hd, L, static_cast<float>(scale));
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kBFloat16, "fp32 or bf16");
    using bf = c10::BFloat16;
    decode_impl<bf>(qc.data_ptr<bf>(), k.data_ptr<bf>(), v.data_ptr<bf>(),
                    sl.data_ptr<int64_t>(), ln.data_ptr<int64_t>(), out.data_ptr<bf>(), B, Hq,
                    Hkv, hd, L, static_cast<float>(scale));
  }
  return out;
}
