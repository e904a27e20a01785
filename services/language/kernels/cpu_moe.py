"""CPU MoE expert formulations: prototypes measured against `torch_ref.fused_moe` (not wired in).

All take the reference's arguments: x `[T, H]`, router weights / expert ids `[T, K]`, and the
expert weights in the layout each one prepares once at load (`prepare_*`), and return `[T, H]`.
`bench/cpu_moe.py` (`epd bench-cpu-kernels --part moe`) times them side by side and checks them
against the reference.

- `active_loop`: only the experts that received rows, one `torch.mm` pair each, on the K-major
  weights the engine already stores (`grouped_mm_layout`: `[E, H, 2I]` / `[E, I, H]`
  contiguous), so each GEMM reads its operand without a relayout.
- `CppMoe`: one C++ op compiled with `torch.utils.cpp_extension.load_inline` (cached on disk in
  `$TORCH_EXTENSIONS_DIR`), the structure of vLLM's CPU kernel (csrc/cpu/cpu_fused_moe.cpp with
  csrc/cpu/micro_gemm/cpu_micro_gemm_vec.hpp): rows grouped by expert with a counting sort;
  work items = (expert with rows, block of output columns), handed out dynamically to the OpenMP
  threads, so only the experts that received tokens read their weights and two threads split
  even a single expert; an 8-row x 32-column register tile of fp32 FMAs over weights packed
  in 16-column panels (`[E, N/16, K, 16]`: one 64-byte load per k per panel); silu(gate) * up
  fused into the first GEMM's tile; the weighted sum of the top-k rows in fp32, one write per
  token. bf16 weights are widened to fp32 in registers (fp32 accumulation throughout).
  `dpbf16=True` instead pairs k in the packing (`[E, N/16, K/2, 16, 2]`) and runs AVX512-BF16
  `vdpbf16ps` (two bf16 products per fp32 lane, as SGLang's sgl-kernel/csrc/cpu/moe.cpp does),
  with the intermediate rounded to bf16 as the reference's bf16 path does.
"""

from __future__ import annotations

import functools
import os
import time

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------
# active experts, torch.mm


def prepare_active_loop(w: torch.Tensor) -> torch.Tensor:
    """`w [E, N, K]` -> contiguous `[E, K, N]`, the `x @ w[e]` operand (the storage that
    `torch_ref.grouped_mm_layout` keeps; there it is viewed back as `[E, N, K]`)."""
    return w.transpose(-2, -1).contiguous()


def active_loop(
    x: torch.Tensor,
    gate_up_kn: torch.Tensor,
    down_kn: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
) -> torch.Tensor:
    """gate_up_kn `[E, H, 2I]`, down_kn `[E, I, H]` (from `prepare_active_loop`)."""
    t, k = experts.shape
    flat = experts.flatten()  # [T*K]
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=gate_up_kn.shape[0]).tolist()
    routing = weights.flatten()
    out = x.new_empty(t * k, x.shape[1])
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        idx = order[start : start + n]  # [n] rows of the [T*K] layout routed to expert e
        start += n
        gate, up = torch.mm(x[idx // k], gate_up_kn[e]).chunk(2, dim=-1)  # [n, I] each
        y = torch.mm(F.silu(gate) * up, down_kn[e])  # [n, H]
        out[idx] = y * routing[idx, None]
    return out.view(t, k, -1).sum(dim=1)


# ------------------------------------------------------------------------------------------------
# C++ (load_inline)

_CPP = r"""
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
"""

CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"]


@functools.cache
def _extension() -> tuple[object, float]:
    """The compiled extension and the seconds `load_inline` took (a compile on first use per
    source and flags, then a load from $TORCH_EXTENSIONS_DIR)."""
    from torch.utils.cpp_extension import load_inline

    t0 = time.perf_counter()
    mod = load_inline(
        name="epd_cpu_moe",
        cpp_sources=_CPP,
        functions=["fused_moe"],
        extra_cflags=CFLAGS,
        extra_ldflags=["-fopenmp"],
        verbose=os.environ.get("EPD_CPP_VERBOSE") == "1",
    )
    return mod, time.perf_counter() - t0


def cpp_load_seconds() -> float:
    return _extension()[1]


def prepare_cpp(w: torch.Tensor, dpbf16: bool = False) -> torch.Tensor:
    """`w [E, N, K]` -> 16-column panels `[E, N/16, K, 16]` (one 64-byte row per k), or with
    `dpbf16` k-pairs `[E, N/16, K/2, 16, 2]` for vdpbf16ps."""
    e, n, k = w.shape
    if n % 64 or k % 2:
        raise ValueError(f"expert weights [E, N, K] need N % 64 == 0 (got {tuple(w.shape)})")
    panels = w.reshape(e, n // 16, 16, k)
    if dpbf16:
        return panels.reshape(e, n // 16, 16, k // 2, 2).permute(0, 1, 3, 2, 4).contiguous()
    return panels.transpose(2, 3).contiguous()


def cpp_moe(
    x: torch.Tensor,
    gate_up_packed: torch.Tensor,
    down_packed: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    dpbf16: bool = False,
) -> torch.Tensor:
    """The C++ op on weights from `prepare_cpp` (same `dpbf16`)."""
    mod, _ = _extension()
    fn = mod.fused_moe  # type: ignore[attr-defined]
    return fn(x.contiguous(), gate_up_packed, down_packed, weights, experts, dpbf16)  # type: ignore[no-any-return]
