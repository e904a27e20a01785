// Attention of query rows over the paged KV cache, read in place (no gathered copy of the
// context), as vLLM's CPU backend does for decode (vllm/v1/attention/backends/cpu_attn.py). A
// row is one query token: a decode row, or one token of a prefill chunk (causal: it sees the
// keys up to its own position), so a step of short prompts is one call instead of an SDPA per
// prompt.
//
//   q        [R, Hq, hd]        the rows' queries (fp32 or bf16)
//   k, v     [slots, Hkv, hd]   one layer's cache (same dtype)
//   slots    [S, L] int64       slot of token t of sequence s (padded past its length)
//   lens     [R] int64          keys row r sees (its sequence's first lens[r] tokens)
//   seq      [R] int64          row r's sequence (empty: row r is sequence r)
//   -> out   [R, Hq, hd]
//
// Work items are (row, KV head): the g = Hq/Hkv query heads that share a KV head read each
// key and value once. Keys come in blocks of 16 tokens: the block's scores for every query head
// (AVX-512 dot products), an online-softmax update of fp32 accumulators with a vectorised exp,
// then the values; a long context never needs a buffer. hd must be a multiple of 16.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vec_math.h"

namespace {

using bf16 = c10::BFloat16;

using epd_vec::exp16;
using epd_vec::load16;
using epd_vec::store16;

constexpr int TB = 16;     // tokens per block: one zmm of scores per query head
constexpr int MAX_G = 16;  // query heads per KV head
constexpr int MAX_D = 16;  // hd / 16

// Every cache line of one head's row of hd values.
template <typename T>
inline void prefetch_row(const T* p, int hd) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int b = 0; b < hd * static_cast<int>(sizeof(T)); b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
}

template <typename T>
void rows_impl(const T* q, const T* k, const T* v, const int64_t* slots, const int64_t* lens,
               const int64_t* seq, T* out, int B, int Hq, int Hkv, int hd, int L, float scale) {
  const int g = Hq / Hkv, nd = hd / 16;
#pragma omp parallel for num_threads(at::get_num_threads()) schedule(dynamic, 1)
  for (int item = 0; item < B * Hkv; ++item) {
    const int b = item / Hkv, h = item % Hkv;
    const int n = static_cast<int>(lens[b]);
    const int64_t* srow = slots + (seq ? seq[b] : b) * L;
    __m512 qv[MAX_G][MAX_D], acc[MAX_G][MAX_D];
    float m[MAX_G], l[MAX_G];
    alignas(64) float s[MAX_G][TB];
    for (int i = 0; i < g; ++i) {
      const T* qp = q + ((int64_t)b * Hq + h * g + i) * hd;
      for (int c = 0; c < nd; ++c) {
        qv[i][c] = _mm512_mul_ps(load16(qp + 16 * c), _mm512_set1_ps(scale));
        acc[i][c] = _mm512_setzero_ps();
      }
      m[i] = -std::numeric_limits<float>::infinity();
      l[i] = 0.f;
    }
    for (int t0 = 0; t0 < n; t0 += TB) {
      const int tb = std::min(TB, n - t0);
      // Slots are indirect, so the hardware prefetcher cannot follow a context from block to
      // block: ask for this block's values (read after the softmax) and the next block's keys
      // now. In a decode step each layer's context comes cold from memory: at batch 32 and
      // context 124 the kernel took 0.29-0.35 ms a layer inside engine steps without this,
      // 0.22-0.24 with it, 0.15 when the same call repeats with the cache warm.
      for (int j = 0; j < tb; ++j) prefetch_row(v + (srow[t0 + j] * Hkv + h) * hd, hd);
      for (int j = t0 + TB; j < std::min(n, t0 + 2 * TB); ++j)
        prefetch_row(k + (srow[j] * Hkv + h) * hd, hd);
      for (int j = 0; j < tb; ++j) {
        const T* kp = k + (srow[t0 + j] * Hkv + h) * hd;
        __m512 kc[MAX_D];
        for (int c = 0; c < nd; ++c) kc[c] = load16(kp + 16 * c);
        for (int i = 0; i < g; ++i) {
          __m512 d = _mm512_mul_ps(qv[i][0], kc[0]);
          for (int c = 1; c < nd; ++c) d = _mm512_fmadd_ps(qv[i][c], kc[c], d);
          s[i][j] = _mm512_reduce_add_ps(d);
        }
      }
      const __mmask16 live = static_cast<__mmask16>((1u << tb) - 1);
      for (int i = 0; i < g; ++i) {
        const __m512 sc = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), live, s[i]);
        const float new_m = std::max(m[i], _mm512_reduce_max_ps(sc));
        const float corr = std::exp(m[i] - new_m);  // 0 on the first block
        const __m512 p = exp16(_mm512_sub_ps(sc, _mm512_set1_ps(new_m)));
        l[i] = l[i] * corr + _mm512_reduce_add_ps(p);
        m[i] = new_m;
        _mm512_store_ps(s[i], p);
        const __m512 cv = _mm512_set1_ps(corr);
        for (int c = 0; c < nd; ++c) acc[i][c] = _mm512_mul_ps(acc[i][c], cv);
      }
      for (int j = 0; j < tb; ++j) {
        const T* vp = v + (srow[t0 + j] * Hkv + h) * hd;
        __m512 vc[MAX_D];
        for (int c = 0; c < nd; ++c) vc[c] = load16(vp + 16 * c);
        for (int i = 0; i < g; ++i) {
          const __m512 pj = _mm512_set1_ps(s[i][j]);
          for (int c = 0; c < nd; ++c) acc[i][c] = _mm512_fmadd_ps(pj, vc[c], acc[i][c]);
        }
      }
    }
    for (int i = 0; i < g; ++i) {
      T* op = out + ((int64_t)b * Hq + h * g + i) * hd;
      const __m512 inv = _mm512_set1_ps(l[i] > 0.f ? 1.f / l[i] : 0.f);
      for (int c = 0; c < nd; ++c) store16(op + 16 * c, _mm512_mul_ps(acc[i][c], inv));
    }
  }
}

}  // namespace

torch::Tensor paged_attention_rows(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                  torch::Tensor slots, torch::Tensor lens, torch::Tensor seq,
                                  double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q [R, Hq, hd], k/v [S, Hkv, hd]");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous(), "the cache must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "q, k and v share a dtype");
  const int B = q.size(0), Hq = q.size(1), hd = q.size(2), Hkv = k.size(1);
  TORCH_CHECK(Hq % Hkv == 0 && k.size(2) == hd, "GQA shapes");
  TORCH_CHECK(hd % 16 == 0 && hd / 16 <= MAX_D && Hq / Hkv <= MAX_G,
              "head_dim a multiple of 16 up to 256, at most 16 query heads per KV head");
  auto qc = q.contiguous();
  auto sl = slots.to(torch::kInt64).contiguous();
  auto ln = lens.to(torch::kInt64).contiguous();
  auto sq = seq.to(torch::kInt64).contiguous();
  const bool by_seq = sq.numel() > 0;
  TORCH_CHECK(sl.dim() == 2 && ln.numel() == B && (by_seq ? sq.numel() == B : sl.size(0) == B),
              "slots [S, L], lens [R], seq [R] (or empty: row r reads slots row r)");
  auto out = torch::empty_like(qc);
  const int L = sl.size(1);
  const int64_t* seqp = by_seq ? sq.data_ptr<int64_t>() : nullptr;
  if (q.scalar_type() == torch::kFloat32) {
    rows_impl<float>(qc.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                     sl.data_ptr<int64_t>(), ln.data_ptr<int64_t>(), seqp, out.data_ptr<float>(),
                     B, Hq, Hkv, hd, L, static_cast<float>(scale));
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kBFloat16, "fp32 or bf16");
    rows_impl<bf16>(qc.data_ptr<bf16>(), k.data_ptr<bf16>(), v.data_ptr<bf16>(),
                    sl.data_ptr<int64_t>(), ln.data_ptr<int64_t>(), seqp, out.data_ptr<bf16>(),
                    B, Hq, Hkv, hd, L, static_cast<float>(scale));
  }
  return out;
}
