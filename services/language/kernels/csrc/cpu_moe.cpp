// Fused MoE experts for x86 CPUs with AVX-512 (fp32, and bf16 with AVX512-BF16), the structure
// of vLLM's CPU kernel (csrc/cpu/cpu_fused_moe.cpp, micro_gemm/cpu_micro_gemm_vec.hpp) with
// SGLang's k-paired vdpbf16ps packing (sgl-kernel/csrc/cpu/moe.cpp) for bf16:
//   - the T*K (token, slot) rows are grouped by expert with a counting sort;
//   - work items are (expert that received rows, block of 64 output columns), handed out to the
//     OpenMP threads dynamically, so only those experts' weights are read and two threads split
//     even a single expert;
//   - an 8-row x 32-column register tile of fp32 FMAs over weights packed once at load into
//     16-column panels ([E, N/16, K, 16]: one 64-byte load per k per panel), or k-paired panels
//     ([E, N/16, K/2, 16, 2]) for vdpbf16ps; fp32 accumulation throughout;
//   - silu(gate) * up fused into the first GEMM's tile (rounded to bf16 on the bf16 path, as the
//     torch reference rounds it), then the weighted sum of the top-k rows in fp32, one write per
//     token.
// Built on first use with the other CPU kernels (services/language/kernels/cpu_ext.py).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using bf16 = c10::BFloat16;

inline float to_f(float v) { return v; }
inline float to_f(bf16 v) { return static_cast<float>(v); }

// 16 weights of one packed panel row -> fp32 lanes.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// C[M, 32] = A[M, K] (fp32, row stride K) @ B (two 16-column panels [K, 16] each).
template <int M, typename w_t>
inline void tile(const float* A, int K, const w_t* B0, const w_t* B1, float* C, int ldc) {
  __m512 acc[M][2];
  for (int m = 0; m < M; ++m) { acc[m][0] = _mm512_setzero_ps(); acc[m][1] = _mm512_setzero_ps(); }
  for (int k = 0; k < K; ++k) {
    __m512 b0 = load16(B0 + k * 16), b1 = load16(B1 + k * 16);
    for (int m = 0; m < M; ++m) {
      __m512 a = _mm512_set1_ps(A[m * K + k]);
      acc[m][0] = _mm512_fmadd_ps(a, b0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(a, b1, acc[m][1]);
    }
  }
  for (int m = 0; m < M; ++m) {
    _mm512_storeu_ps(C + m * ldc, acc[m][0]);
    _mm512_storeu_ps(C + m * ldc + 16, acc[m][1]);
  }
}

// The same with k paired for vdpbf16ps: A is bf16 [M, K] (pairs read as one 32-bit lane),
// B panels are [K/2, 16, 2] bf16.
template <int M>
inline void tile_dp(const bf16* A, int K, const bf16* B0, const bf16* B1, float* C, int ldc) {
  __m512 acc[M][2];
  for (int m = 0; m < M; ++m) { acc[m][0] = _mm512_setzero_ps(); acc[m][1] = _mm512_setzero_ps(); }
  const int32_t* a32 = reinterpret_cast<const int32_t*>(A);
  for (int k2 = 0; k2 < K / 2; ++k2) {
    __m512bh b0 = (__m512bh)_mm512_loadu_si512(B0 + k2 * 32);
    __m512bh b1 = (__m512bh)_mm512_loadu_si512(B1 + k2 * 32);
    for (int m = 0; m < M; ++m) {
      __m512bh a = (__m512bh)_mm512_set1_epi32(a32[m * (K / 2) + k2]);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], a, b0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], a, b1);
    }
  }
  for (int m = 0; m < M; ++m) {
    _mm512_storeu_ps(C + m * ldc, acc[m][0]);
    _mm512_storeu_ps(C + m * ldc + 16, acc[m][1]);
  }
}

template <typename a_t, typename w_t, bool DP>
inline void tile_any(int m, const a_t* A, int K, const w_t* B0, const w_t* B1, float* C, int ldc) {
  if constexpr (DP) {
    switch (m) {
      case 1: tile_dp<1>(A, K, B0, B1, C, ldc); break;
      case 2: tile_dp<2>(A, K, B0, B1, C, ldc); break;
      case 3: tile_dp<3>(A, K, B0, B1, C, ldc); break;
      case 4: tile_dp<4>(A, K, B0, B1, C, ldc); break;
      case 5: tile_dp<5>(A, K, B0, B1, C, ldc); break;
      case 6: tile_dp<6>(A, K, B0, B1, C, ldc); break;
      case 7: tile_dp<7>(A, K, B0, B1, C, ldc); break;
      default: tile_dp<8>(A, K, B0, B1, C, ldc); break;
    }
  } else {
    switch (m) {
      case 1: tile<1>(A, K, B0, B1, C, ldc); break;
      case 2: tile<2>(A, K, B0, B1, C, ldc); break;
      case 3: tile<3>(A, K, B0, B1, C, ldc); break;
      case 4: tile<4>(A, K, B0, B1, C, ldc); break;
      case 5: tile<5>(A, K, B0, B1, C, ldc); break;
      case 6: tile<6>(A, K, B0, B1, C, ldc); break;
      case 7: tile<7>(A, K, B0, B1, C, ldc); break;
      default: tile<8>(A, K, B0, B1, C, ldc); break;
    }
  }
}

constexpr int MT = 8;    // rows per register tile
constexpr int BN = 64;   // output columns per work item (4 panels)

// scalar_t: activations and output; w_t: weights; DP: vdpbf16ps (bf16 only).
template <typename scalar_t, typename w_t, bool DP>
torch::Tensor moe_impl(torch::Tensor x, torch::Tensor w13, torch::Tensor w2,
                       torch::Tensor topk_w, torch::Tensor topk_ids) {
  using a_t = std::conditional_t<DP, bf16, float>;  // GEMM input rows
  const int T = x.size(0), H = x.size(1), K = topk_ids.size(1);
  const int E = w13.size(0), I = w13.size(1) * 16 / 2;  // w13 packed [E, 2I/16, H(/2), 16(*2)]
  const int R = T * K;
  TORCH_CHECK(I % BN == 0 && H % BN == 0, "hidden and intermediate sizes: multiples of 64");
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const w_t* w13p = reinterpret_cast<const w_t*>(w13.data_ptr());
  const w_t* w2p = reinterpret_cast<const w_t*>(w2.data_ptr());
  const float* twp = topk_w.data_ptr<float>();
  const int64_t* idp = topk_ids.data_ptr<int64_t>();

  // Counting sort of the T*K (token, slot) rows by expert (stable: token order within one).
  std::vector<int> count(E, 0), start(E + 1, 0), row_token(R), pos(R);
  for (int r = 0; r < R; ++r) ++count[idp[r]];
  for (int e = 0; e < E; ++e) start[e + 1] = start[e] + count[e];
  {
    std::vector<int> fill(start.begin(), start.end() - 1);
    for (int r = 0; r < R; ++r) { int s = fill[idp[r]]++; row_token[s] = r / K; pos[r] = s; }
  }
  std::vector<int> active;
  for (int e = 0; e < E; ++e) if (count[e]) active.push_back(e);

  // h [R, I]: silu(gate) * up per sorted row; y [R, H]: its down projection (fp32).
  auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  torch::Tensor h = DP ? torch::empty({R, I}, x.options().dtype(torch::kBFloat16))
                       : torch::empty({R, I}, f32);
  torch::Tensor y = torch::empty({R, H}, f32);
  a_t* hp = reinterpret_cast<a_t*>(h.data_ptr());
  float* yp = y.data_ptr<float>();
  const int nthreads = at::get_num_threads();
  const int64_t w13_expert = (int64_t)2 * I * H, w2_expert = (int64_t)H * I;

  // Stage 1: gate/up for (expert, block of BN gate columns), all of the expert's rows.
  {
    const int nb = I / BN;
    const int tasks = (int)active.size() * nb;
#pragma omp parallel num_threads(nthreads)
    {
      std::vector<a_t> A(MT * H);
      std::vector<float> G(MT * BN), U(MT * BN);
#pragma omp for schedule(dynamic, 1)
      for (int task = 0; task < tasks; ++task) {
        const int e = active[task / nb], n0 = (task % nb) * BN;
        const w_t* we = w13p + e * w13_expert;
        for (int m0 = 0; m0 < count[e]; m0 += MT) {
          const int mm = std::min(MT, count[e] - m0);
          for (int m = 0; m < mm; ++m) {
            const scalar_t* src = xp + (int64_t)row_token[start[e] + m0 + m] * H;
            for (int c = 0; c < H; ++c) A[m * H + c] = static_cast<a_t>(to_f(src[c]));
          }
          for (int p = 0; p < BN; p += 32) {
            const int gp = (n0 + p) / 16, up = (I + n0 + p) / 16;  // panel indexes
            tile_any<a_t, w_t, DP>(mm, A.data(), H, we + (int64_t)gp * 16 * H,
                                   we + (int64_t)(gp + 1) * 16 * H, G.data() + p, BN);
            tile_any<a_t, w_t, DP>(mm, A.data(), H, we + (int64_t)up * 16 * H,
                                   we + (int64_t)(up + 1) * 16 * H, U.data() + p, BN);
          }
          for (int m = 0; m < mm; ++m) {
            a_t* dst = hp + (int64_t)(start[e] + m0 + m) * I + n0;
            for (int c = 0; c < BN; ++c) {
              const float g = G[m * BN + c];
              dst[c] = static_cast<a_t>(g / (1.f + std::exp(-g)) * U[m * BN + c]);
            }
          }
        }
      }
    }
  }
  // Stage 2: down projection for (expert, block of BN output columns).
  {
    const int nb = H / BN;
    const int tasks = (int)active.size() * nb;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int task = 0; task < tasks; ++task) {
      const int e = active[task / nb], n0 = (task % nb) * BN;
      const w_t* we = w2p + e * w2_expert;
      for (int m0 = 0; m0 < count[e]; m0 += MT) {
        const int mm = std::min(MT, count[e] - m0);
        const a_t* A = hp + (int64_t)(start[e] + m0) * I;
        for (int p = 0; p < BN; p += 32) {
          const int pn = (n0 + p) / 16;
          tile_any<a_t, w_t, DP>(mm, A, I, we + (int64_t)pn * 16 * I,
                                 we + (int64_t)(pn + 1) * 16 * I,
                                 yp + (int64_t)(start[e] + m0) * H + n0 + p, H);
        }
      }
    }
  }
  // Stage 3: out[t] = sum_j w[t, j] * y[pos(t, j)], in fp32, top-k order.
  torch::Tensor out = torch::empty({T, H}, x.options());
  scalar_t* op = out.data_ptr<scalar_t>();
#pragma omp parallel num_threads(nthreads)
  {
  std::vector<float> acc(H);
#pragma omp for schedule(static)
  for (int t = 0; t < T; ++t) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int j = 0; j < K; ++j) {
      const float wt = twp[t * K + j];
      const float* src = yp + (int64_t)pos[t * K + j] * H;
      for (int c = 0; c < H; ++c) acc[c] += wt * src[c];
    }
    for (int c = 0; c < H; ++c) op[(int64_t)t * H + c] = static_cast<scalar_t>(acc[c]);
  }
  }
  return out;
}

}  // namespace

torch::Tensor fused_moe(torch::Tensor x, torch::Tensor w13, torch::Tensor w2,
                        torch::Tensor topk_w, torch::Tensor topk_ids, bool dpbf16) {
  TORCH_CHECK(x.is_contiguous() && w13.is_contiguous() && w2.is_contiguous());
  TORCH_CHECK(x.size(1) % 64 == 0, "hidden size must be a multiple of 64");
  auto tw = topk_w.to(torch::kFloat32).contiguous();
  auto ids = topk_ids.to(torch::kInt64).contiguous();
  if (x.scalar_type() == torch::kFloat32 && w13.scalar_type() == torch::kFloat32)
    return moe_impl<float, float, false>(x, w13, w2, tw, ids);
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && w13.scalar_type() == torch::kBFloat16,
              "fp32 or bf16 activations and weights");
  if (dpbf16) return moe_impl<bf16, bf16, true>(x, w13, w2, tw, ids);
  return moe_impl<bf16, bf16, false>(x, w13, w2, tw, ids);
}
