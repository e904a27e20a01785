// Fused MoE experts for x86 CPUs with AVX-512 (fp32, and bf16 with AVX512-BF16), the structure
// of vLLM's CPU kernel (csrc/cpu/cpu_fused_moe.cpp, micro_gemm/cpu_micro_gemm_vec.hpp) with
// SGLang's k-paired vdpbf16ps packing (sgl-kernel/csrc/cpu/moe.cpp) for bf16:
//   - the T*K (token, slot) rows are grouped by expert with a counting sort;
//   - work items are (expert that received rows, block of 64 output columns), handed out to the
//     OpenMP threads dynamically, so only those experts' weights are read and two threads split
//     even a single expert; tiles read the rows through pointers (no gathered copy per task);
//   - a 6-row x 64-column register tile of fp32 FMAs over weights packed once at load into
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
#include <type_traits>
#include <vector>

#include "vec_math.h"

namespace {

using bf16 = c10::BFloat16;

inline float to_f(float v) { return v; }
inline float to_f(bf16 v) { return static_cast<float>(v); }

using epd_vec::exp16;
using epd_vec::load16;
using epd_vec::store16;

// C[M, 64] = A[M, K] (rows at `A[m]`) @ B: four consecutive 16-column panels of `16 * K`
// weights each, fp32 [K, 16] (one 64-byte load per k) or k-paired bf16 [K/2, 16, 2] for
// vdpbf16ps (DP; A rows bf16, pairs read as one 32-bit lane). M <= 6: 24 accumulators + 4
// weight registers, so each k costs 4 loads + M broadcasts for 4M FMAs (an 8x32 tile took 10
// loads per 16 FMAs and ran at ~65% of the FMA peak).
//
// One call covers k in [k0, k0 + KB): A and B point at k0's elements, panels lie `ps` weights
// apart, and `add` accumulates onto C (the k-blocks after the first), so one block of weights
// (4 panels x KB, 32 KB) stays in L1 while the rows of a whole expert stream past it.
template <int M, bool DP, typename a_t, typename w_t>
inline void tile(const a_t* const* A, int k0, int KB, const w_t* B, int64_t ps, float* C,
                 int ldc, bool add) {
  constexpr int NP = 4;
  const int K = KB;
  B += (int64_t)k0 * 16;  // fp32 [K, 16] or bf16 [K/2, 16, 2]: 16 weights per k either way
  __m512 acc[M][NP];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NP; ++j)
      acc[m][j] = add ? _mm512_loadu_ps(C + m * ldc + j * 16) : _mm512_setzero_ps();
  if constexpr (DP) {
    const int32_t* a32[M];
    for (int m = 0; m < M; ++m) a32[m] = reinterpret_cast<const int32_t*>(A[m] + k0);
    for (int k2 = 0; k2 < K / 2; ++k2) {
      __m512bh b[NP];
      for (int j = 0; j < NP; ++j)
      {
        b[j] = (__m512bh)_mm512_loadu_si512(B + j * ps + k2 * 32);
        asm("" : "+v"(b[j]));  // one load per weight vector, as above
      }
      for (int m = 0; m < M; ++m) {
        __m512bh a = (__m512bh)_mm512_set1_epi32(a32[m][k2]);
        for (int j = 0; j < NP; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], a, b[j]);
      }
    }
  } else {
    for (int k = 0; k < K; ++k) {
      __m512 b[NP];
      for (int j = 0; j < NP; ++j) {
        b[j] = load16(B + j * ps + k * 16);
        // Keep b in a register: gcc otherwise folds the load into each row's FMA, M loads
        // of every weight vector instead of one (load-port bound at ~77% of the FMA peak).
        asm("" : "+v"(b[j]));
      }
      for (int m = 0; m < M; ++m) {
        __m512 a = _mm512_set1_ps(to_f(A[m][k0 + k]));
        for (int j = 0; j < NP; ++j) acc[m][j] = _mm512_fmadd_ps(a, b[j], acc[m][j]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NP; ++j) _mm512_storeu_ps(C + m * ldc + j * 16, acc[m][j]);
}

template <bool DP, typename a_t, typename w_t>
inline void tile_any(int m, const a_t* const* A, int k0, int KB, const w_t* B, int64_t ps,
                     float* C, int ldc, bool add) {
  switch (m) {
    case 1: tile<1, DP>(A, k0, KB, B, ps, C, ldc, add); break;
    case 2: tile<2, DP>(A, k0, KB, B, ps, C, ldc, add); break;
    case 3: tile<3, DP>(A, k0, KB, B, ps, C, ldc, add); break;
    case 4: tile<4, DP>(A, k0, KB, B, ps, C, ldc, add); break;
    case 5: tile<5, DP>(A, k0, KB, B, ps, C, ldc, add); break;
    default: tile<6, DP>(A, k0, KB, B, ps, C, ldc, add); break;
  }
}

// C[rows, 64] (+)= A[rows, K] @ 4 panels, k-block by k-block, each over all the rows.
template <bool DP, typename a_t, typename w_t>
inline void gemm_rows(int rows, const a_t* const* A, int K, const w_t* B, float* C, int ldc) {
  // 4 panels x KB weights = 32 KB. One tile of rows reuses nothing: it streams all of K.
  const int KB = rows <= 6 ? K : (DP ? 256 : 128);
  const int64_t ps = (int64_t)16 * K;
  for (int k0 = 0; k0 < K; k0 += KB) {
    const int kb = std::min(KB, K - k0);
    for (int m0 = 0; m0 < rows; m0 += 6)
      tile_any<DP>(std::min(6, rows - m0), A + m0, k0, kb, B, ps, C + (int64_t)m0 * ldc, ldc,
                   k0 > 0);
  }
}

constexpr int BN = 64;   // output columns per work item and tile (4 panels)

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

  // The GEMM input rows: x itself where its dtype is the tiles' (fp32, or bf16 for vdpbf16ps),
  // else x converted once (bf16 activations on fp32 tiles). Tiles read rows through pointers,
  // so an expert's rows are never gathered into a copy.
  auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  torch::Tensor xa = std::is_same_v<a_t, scalar_t> ? x : x.to(torch::kFloat32);
  const a_t* xap = reinterpret_cast<const a_t*>(xa.data_ptr());
  // h [R, I]: silu(gate) * up per sorted row; y [R, H]: its down projection (fp32).
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
      std::vector<const a_t*> A;
      std::vector<float> G, U;
#pragma omp for schedule(dynamic, 1)
      for (int task = 0; task < tasks; ++task) {
        const int e = active[task / nb], n0 = (task % nb) * BN, rows = count[e];
        const w_t* we = w13p + e * w13_expert;
        A.resize(rows);
        G.resize((size_t)rows * BN);
        U.resize((size_t)rows * BN);
        for (int m = 0; m < rows; ++m) A[m] = xap + (int64_t)row_token[start[e] + m] * H;
        const int gp = n0 / 16, up = (I + n0) / 16;  // first gate / up panel
        gemm_rows<DP>(rows, A.data(), H, we + (int64_t)gp * 16 * H, G.data(), BN);
        gemm_rows<DP>(rows, A.data(), H, we + (int64_t)up * 16 * H, U.data(), BN);
        const __m512 one = _mm512_set1_ps(1.f);
        for (int m = 0; m < rows; ++m) {
          a_t* dst = hp + (int64_t)(start[e] + m) * I + n0;
          for (int c = 0; c < BN; c += 16) {  // silu(g) * u = g / (1 + exp(-g)) * u
            const __m512 g = _mm512_loadu_ps(&G[m * BN + c]), u = _mm512_loadu_ps(&U[m * BN + c]);
            const __m512 den = _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)));
            store16(dst + c, _mm512_mul_ps(_mm512_div_ps(g, den), u));
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
      std::vector<const a_t*> A(count[e]);
      for (int m = 0; m < count[e]; ++m) A[m] = hp + (int64_t)(start[e] + m) * I;
      gemm_rows<DP>(count[e], A.data(), I, we + (int64_t)(n0 / 16) * 16 * I,
                    yp + (int64_t)start[e] * H + n0, H);
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
