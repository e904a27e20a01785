// RMSNorm, residual add + RMSNorm, and the attention's per-head q/k RMSNorm + rotary embedding
// for x86 CPUs with AVX-512: one pass over each row instead of the 5-10 torch ops (each its own
// OpenMP region and temporary) of the reference (services/language/kernels/torch_ref.py).
//
// Each follows the reference's arithmetic: the norm in fp32, rounded to the activations' dtype,
// then scaled by the weight (rounded again); the rotation as `x * cos + rotate_half(x) * sin`
// with every product and the sum rounded to the dtype, as torch's ops round them (intrinsics,
// never contracted into FMAs). Only the sum of squares runs in another order (16 lanes).
// Rows are split over the OpenMP threads; the dimension must be a multiple of 16 (head_dim a
// multiple of 32 for the rotation).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <cmath>

#include "vec_math.h"

namespace {

using epd_vec::bf16;
using epd_vec::load16;
using epd_vec::store16;

constexpr int MAX_V = 512;  // 16-lane vectors per row at most (8192 columns)

// v rounded to T's precision (round to nearest even for bf16), kept in fp32 lanes.
inline __m512 round_to(__m512 v, const float*) { return v; }
inline __m512 round_to(__m512 v, const bf16*) {
  __m512i bits = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000))));
}

// y[0..nv) = round(w * round(x * rsqrt(mean(x^2) + eps))), x already in fp32 lanes.
template <typename T>
inline void norm_row(__m512* y, int nv, const T* w, float eps) {
  const T* tag = nullptr;
  __m512 acc = _mm512_setzero_ps();
  for (int c = 0; c < nv; ++c) acc = _mm512_add_ps(acc, _mm512_mul_ps(y[c], y[c]));
  const float r = 1.f / std::sqrt(_mm512_reduce_add_ps(acc) / (16 * nv) + eps);
  const __m512 rv = _mm512_set1_ps(r);
  for (int c = 0; c < nv; ++c)
    y[c] = round_to(_mm512_mul_ps(load16(w + 16 * c), round_to(_mm512_mul_ps(y[c], rv), tag)),
                    tag);
}

template <typename T>
void rms_norm_impl(const T* x, const T* res, const T* w, T* out, T* new_res, int64_t rows,
                   int d, int64_t ld, float eps) {
  const int nv = d / 16;
  const T* tag = nullptr;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    __m512 y[MAX_V];
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * ld;
      for (int c = 0; c < nv; ++c) y[c] = load16(xr + 16 * c);
      if (res != nullptr) {  // new_res = res + x, rounded; the norm reads it
        const T* rr = res + r * d;
        for (int c = 0; c < nv; ++c) {
          y[c] = round_to(_mm512_add_ps(load16(rr + 16 * c), y[c]), tag);
          store16(new_res + r * d + 16 * c, y[c]);
        }
      }
      norm_row(y, nv, w, eps);
      for (int c = 0; c < nv; ++c) store16(out + r * d + 16 * c, y[c]);
    }
  });
}

// One head vector (nv lanes of 16, hd = 16 nv) normed and rotated: rotate_half(x) is
// (-x[half:], x[:half]).
template <typename T>
inline void norm_rope_head(const T* src, const T* w, const T* cs, const T* sn, T* dst, int nv,
                           float eps) {
  const T* tag = nullptr;
  __m512 y[16];
  for (int c = 0; c < nv; ++c) y[c] = load16(src + 16 * c);
  norm_row(y, nv, w, eps);
  const int h = nv / 2;
  const __m512 zero = _mm512_setzero_ps();
  for (int c = 0; c < h; ++c) {
    const __m512 a = y[c], b = y[c + h];
    const __m512 lo = _mm512_add_ps(
        round_to(_mm512_mul_ps(a, load16(cs + 16 * c)), tag),
        round_to(_mm512_mul_ps(_mm512_sub_ps(zero, b), load16(sn + 16 * c)), tag));
    const __m512 hi = _mm512_add_ps(
        round_to(_mm512_mul_ps(b, load16(cs + 16 * (c + h))), tag),
        round_to(_mm512_mul_ps(a, load16(sn + 16 * (c + h))), tag));
    store16(dst + 16 * c, round_to(lo, tag));
    store16(dst + 16 * (c + h), round_to(hi, tag));
  }
}

template <typename T>
void qk_impl(const T* q, int64_t ldq, const T* k, int64_t ldk, const T* qw, const T* kw,
             const T* cs, const T* sn, T* qo, T* ko, int64_t rows, int hq, int hkv, int hd,
             float eps) {
  const int nv = hd / 16, heads = hq + hkv;
  at::parallel_for(0, rows * heads, 32, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / heads;
      const int h = static_cast<int>(i % heads);
      const T* c = cs + t * hd;
      const T* s = sn + t * hd;
      if (h < hq)
        norm_rope_head(q + t * ldq + h * hd, qw, c, s, qo + (t * hq + h) * hd, nv, eps);
      else
        norm_rope_head(k + t * ldk + (h - hq) * hd, kw, c, s, ko + (t * hkv + h - hq) * hd, nv,
                       eps);
    }
  });
}

void check_rows(const torch::Tensor& x, int d, const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, what, ": [rows, ", d, "] with unit column stride");
}

}  // namespace

// x [rows, d] (rows may be strided), weight [d] -> [rows, d]; with `residual` [rows, d]: the
// norm of residual + x, returned with that sum (`out`, `new_residual`).
std::vector<torch::Tensor> rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual,
                                    torch::Tensor weight, double eps) {
  const int64_t rows = x.size(0);
  const int d = x.size(1);
  check_rows(x, d, "x");
  TORCH_CHECK(d % 16 == 0 && d / 16 <= MAX_V, "rms_norm: the dimension must be a multiple of 16");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == d && weight.scalar_type() == x.scalar_type(),
              "rms_norm: weight [d] in x's dtype");
  auto out = torch::empty({rows, d}, x.options());
  torch::Tensor res, new_res;
  if (residual.has_value()) {
    res = residual->contiguous();
    TORCH_CHECK(res.sizes() == x.sizes() && res.scalar_type() == x.scalar_type(), "residual");
    new_res = torch::empty({rows, d}, x.options());
  }
  const float e = static_cast<float>(eps);
  if (x.scalar_type() == torch::kFloat32) {
    rms_norm_impl<float>(x.data_ptr<float>(), res.defined() ? res.data_ptr<float>() : nullptr,
                         weight.data_ptr<float>(), out.data_ptr<float>(),
                         new_res.defined() ? new_res.data_ptr<float>() : nullptr, rows, d,
                         x.stride(0), e);
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "rms_norm: fp32 or bf16");
    rms_norm_impl<bf16>(x.data_ptr<bf16>(), res.defined() ? res.data_ptr<bf16>() : nullptr,
                        weight.data_ptr<bf16>(), out.data_ptr<bf16>(),
                        new_res.defined() ? new_res.data_ptr<bf16>() : nullptr, rows, d,
                        x.stride(0), e);
  }
  if (new_res.defined()) return {out, new_res};
  return {out};
}

// q [T, Hq*hd], k [T, Hkv*hd] (row-strided views of the fused projection), the norms' weights
// [hd], cos / sin [T, hd] -> (q [T, Hq, hd], k [T, Hkv, hd]) normed per head and rotated.
std::vector<torch::Tensor> qk_norm_rope(torch::Tensor q, torch::Tensor k, torch::Tensor q_weight,
                                        torch::Tensor k_weight, torch::Tensor cos,
                                        torch::Tensor sin, int64_t hq, int64_t hkv,
                                        double eps) {
  const int64_t rows = q.size(0);
  const int hd = q.size(1) / hq;
  check_rows(q, hq * hd, "q");
  check_rows(k, hkv * hd, "k");
  TORCH_CHECK(hd % 32 == 0 && hd <= 256 && k.size(1) == hkv * hd && k.size(0) == rows,
              "qk_norm_rope: head_dim a multiple of 32 up to 256");
  auto dt = q.scalar_type();
  for (const auto* t : {&k, &q_weight, &k_weight, &cos, &sin})
    TORCH_CHECK(t->scalar_type() == dt, "qk_norm_rope: one dtype");
  auto c = cos.contiguous(), s = sin.contiguous();
  auto qw = q_weight.contiguous(), kw = k_weight.contiguous();
  TORCH_CHECK(c.numel() == rows * hd && s.numel() == rows * hd, "cos / sin [T, hd]");
  auto qo = torch::empty({rows, hq, hd}, q.options());
  auto ko = torch::empty({rows, hkv, hd}, q.options());
  const float e = static_cast<float>(eps);
  if (dt == torch::kFloat32) {
    qk_impl<float>(q.data_ptr<float>(), q.stride(0), k.data_ptr<float>(), k.stride(0),
                   qw.data_ptr<float>(), kw.data_ptr<float>(), c.data_ptr<float>(),
                   s.data_ptr<float>(), qo.data_ptr<float>(), ko.data_ptr<float>(), rows, hq,
                   hkv, hd, e);
  } else {
    TORCH_CHECK(dt == torch::kBFloat16, "qk_norm_rope: fp32 or bf16");
    qk_impl<bf16>(q.data_ptr<bf16>(), q.stride(0), k.data_ptr<bf16>(), k.stride(0),
                  qw.data_ptr<bf16>(), kw.data_ptr<bf16>(), c.data_ptr<bf16>(),
                  s.data_ptr<bf16>(), qo.data_ptr<bf16>(), ko.data_ptr<bf16>(), rows, hq, hkv,
                  hd, e);
  }
  return {qo, ko};
}
