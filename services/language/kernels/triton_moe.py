"""Triton fused MoE: align tokens to experts, two grouped GEMMs, top-k reduction.

Weights stay in the layout `common/weights.py` loads (either hub layout is converted there, once):
gate_up_proj `[E, 2I, H]` (gate rows 0..I-1, up rows I..2I-1) and down_proj `[E, H, I]`. Kernels
take strides, so each weight tile is read K-contiguous from that layout with no per-step transpose.

One forward over `T` tokens routed to `K` experts each (`n = T*K` routed rows, flat id t*K + k):

1. `moe_align`: flat ids sorted by expert, each expert's run padded to a multiple of BLOCK_M
   (padding holds the sentinel n), plus each M-block's expert. Device ops only, no host sync and
   no data-dependent shape (so it can be captured in a CUDA graph): the buffers have the
   worst-case size n + min(E, n) * (BLOCK_M - 1), known from the shapes alone, and blocks past the
   used length (read on the device) exit at once. Counts come from `scatter_add_`, not
   `torch.bincount`, which reads the largest id back to the host on CUDA.
2. `_gate_up_kernel`: per (M-block, N-block of I), `x[token] @ W_gate^T` and `x[token] @ W_up^T`
   into two fp32 accumulators; the epilogue writes silu(gate) * up to `inter [n, I]` (x.dtype).
3. `_down_kernel`: per (M-block, N-block of H), `inter[row] @ W_down^T` times the row's router
   weight, written to `rows_out [n, H]`.
4. `_topk_sum_kernel`: `out[t] = sum_k rows_out[t*K + k]` in fp32 (skipped when K == 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from services.language.kernels.triton_common import cdiv, check_dtype, dot_precision, upcast_tiles


@dataclass(frozen=True)
class MoeConfig:
    """Tile sizes of both grouped GEMMs. Every block dim must be >= 16 (tl.dot's minimum)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


# Shape classes keyed by routed rows per expert (T*K/E). Decode (<= 16 rows per expert) streams
# expert weights: the smallest M tile and long K tiles keep many loads in flight per program.
# Prefill is compute bound: larger M/N tiles reuse each weight tile across more tokens.
# Starting points after vLLM/SGLang's defaults for these shapes; not yet tuned on a GPU here.
MOE_CONFIGS: tuple[tuple[float, MoeConfig], ...] = (
    (16, MoeConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)),  # decode
    (64, MoeConfig(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=4)),  # mixed
    (float("inf"), MoeConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)),
)


def pick_config(num_tokens: int, top_k: int, num_experts: int) -> MoeConfig:
    rows_per_expert = num_tokens * top_k / num_experts
    return next(cfg for limit, cfg in MOE_CONFIGS if rows_per_expert <= limit)


def moe_align(
    experts: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """experts `[T, K]` -> (sorted_ids `[B*BM]` int32, block_expert `[B]` int32, num_padded `[1]`).

    sorted_ids lists flat ids t*K+k grouped by expert (stable), each group padded with the
    sentinel T*K to a multiple of block_m; block b of it belongs to expert block_expert[b]
    (E for blocks past the end). num_padded is the used length, read on device by the kernels.
    """
    flat = experts.flatten().long()  # scatter_add_ takes int64 indices
    n = flat.numel()
    counts = torch.zeros(num_experts, dtype=flat.dtype, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [E] rows per expert
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    ends = padded.cumsum(0)  # [E] end of each expert's padded run
    order = flat.argsort(stable=True)  # [n] flat ids, grouped by expert
    sorted_experts = flat[order]
    rank = torch.arange(n, device=flat.device) - (counts.cumsum(0) - counts)[sorted_experts]
    dest = (ends - padded)[sorted_experts] + rank  # [n] position of each id in the padded list
    num_blocks = triton.cdiv(n + min(num_experts, n) * (block_m - 1), block_m)
    sorted_ids = torch.full((num_blocks * block_m,), n, dtype=torch.int32, device=flat.device)
    sorted_ids[dest] = order.to(torch.int32)
    starts = torch.arange(num_blocks, device=flat.device) * block_m
    block_expert = torch.searchsorted(ends, starts, right=True).to(torch.int32)  # [B]
    return sorted_ids, block_expert, ends[-1:].to(torch.int32)


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, out_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    H, inter_dim, num_rows, top_k,
    stride_xt, stride_we, stride_wn, stride_wk, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_n = cdiv(inter_dim, BLOCK_N)
    pid_m, pid_n = pid // num_n, pid % num_n
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    rows = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM] flat ids
    row_ok = rows < num_rows
    tokens = (rows // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inter_dim
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :]  # [BM, BK]
    g_ptrs = w_ptr + e * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    u_ptrs = g_ptrs + inter_dim * stride_wn  # up rows follow the gate rows; tiles [BK, BN]
    acc_g = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc_u = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, cdiv(H, BLOCK_K)):
        k_ok = offs_k < H - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a, g, u = a.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
        acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    y = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up, fp32
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_ot + offs_n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(
    a_ptr, w_ptr, out_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, router_ptr,
    H, inter_dim, num_rows,
    stride_at, stride_we, stride_wn, stride_wk, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_n = cdiv(H, BLOCK_N)
    pid_m, pid_n = pid // num_n, pid % num_n
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    rows = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = rows < num_rows
    rows64 = rows.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns (H)
    n_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)  # reduction over I
    a_ptrs = a_ptr + rows64[:, None] * stride_at + offs_k[None, :]
    w_ptrs = w_ptr + e * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, cdiv(inter_dim, BLOCK_K)):
        k_ok = offs_k < inter_dim - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    router = tl.load(router_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * router[:, None]
    out_ptrs = out_ptr + rows64[:, None] * stride_ot + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _topk_sum_kernel(src_ptr, out_ptr, H, top_k, BLOCK_H: tl.constexpr):
    """out[t, :] = sum_k src[t*K + k, :] for one (token, H-block); src/out contiguous."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = offs < H
    acc = tl.full((BLOCK_H,), 0.0, tl.float32)
    for k in range(0, top_k):
        acc += tl.load(src_ptr + (t * top_k + k) * H + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def fused_moe(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    config: MoeConfig | None = None,
) -> torch.Tensor:
    """Same contract as `torch_ref.fused_moe`: x `[T, H]`, gate_up_proj `[E, 2I, H]`,
    down_proj `[E, H, I]` (any strides), router weights/experts `[T, K]` -> `[T, H]`."""
    dtype = check_dtype(x, gate_up_proj, down_proj)
    x = x.contiguous()
    (t, h), (e, two_i, h_w), k = x.shape, gate_up_proj.shape, experts.shape[1]
    i = two_i // 2
    if h_w != h or down_proj.shape != (e, h, i) or weights.shape != experts.shape:
        raise ValueError(
            f"shapes disagree: x {tuple(x.shape)}, gate_up_proj {tuple(gate_up_proj.shape)}, "
            f"down_proj {tuple(down_proj.shape)}, weights {tuple(weights.shape)}, "
            f"experts {tuple(experts.shape)}"
        )
    cfg = config or pick_config(t, k, e)
    n = t * k
    if n == 0:
        return torch.zeros_like(x)
    sorted_ids, block_expert, num_padded = moe_align(experts, e, cfg.block_m)
    num_blocks = block_expert.shape[0]
    flags = {
        "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
        "UPCAST": upcast_tiles(dtype), "PRECISION": dot_precision(dtype),
        "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
    }  # fmt: skip
    inter = torch.empty(n, i, dtype=dtype, device=x.device)  # silu(gate) * up per routed row
    _gate_up_kernel[(num_blocks * triton.cdiv(i, cfg.block_n),)](
        x, gate_up_proj, inter, sorted_ids, block_expert, num_padded,
        h, i, n, k,
        x.stride(0), *gate_up_proj.stride(), inter.stride(0),
        **flags,
    )  # fmt: skip
    rows_out = torch.empty(n, h, dtype=dtype, device=x.device)  # weighted expert output per row
    _down_kernel[(num_blocks * triton.cdiv(h, cfg.block_n),)](
        inter, down_proj, rows_out, sorted_ids, block_expert, num_padded,
        weights.contiguous().flatten(),
        h, i, n,
        inter.stride(0), *down_proj.stride(), rows_out.stride(0),
        **flags,
    )  # fmt: skip
    if k == 1:
        return rows_out
    out = torch.empty_like(x)
    block_h = min(1024, triton.next_power_of_2(h))
    _topk_sum_kernel[(t, triton.cdiv(h, block_h))](rows_out, out, h, k, BLOCK_H=block_h)
    return out
