"""Triton RMSNorm, and RMSNorm with the residual add fused in (one read of each input).

Rows are the flattened leading dims of a contiguous `[..., D]` tensor; one program per row,
the whole row in one tile (D <= 8192 covers every supported hidden size and head dim). Math in
fp32 with the reference's rounding order: normed is rounded to x's dtype before the weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.language.kernels.triton_common import check_dtype, sum_

MAX_DIM = 8192


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, D, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(res_ptr + row * D + offs, mask=ok, other=0.0).to(tl.float32)
        x = x.to(new_res_ptr.dtype.element_ty)  # the residual stream stays in the model dtype
        tl.store(new_res_ptr + row * D + offs, x, mask=ok)
        x = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(sum_(x * x, axis=0) / D + eps)
    normed = (x * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=ok)


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    check_dtype(x, weight, *([] if residual is None else [residual]))
    d = x.shape[-1]
    if weight.shape != (d,) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"shapes disagree: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if d > MAX_DIM:
        raise ValueError(f"RMSNorm over {d} > {MAX_DIM} features is not supported")
    x = x.contiguous()
    out = torch.empty_like(x)
    new_res = torch.empty_like(x) if residual is not None else None
    rows = x.numel() // d
    if rows:
        _rms_norm_kernel[(rows,)](
            x, residual.contiguous() if residual is not None else x, weight, out,
            new_res if new_res is not None else out, d, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_D=triton.next_power_of_2(d),
            num_warps=4 if d <= 2048 else 8,
        )  # fmt: skip
    return out, new_res


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x `[..., D]`, weight `[D]` -> `[..., D]` (same contract as `torch_ref.rms_norm`)."""
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x), one pass (same contract as the torch reference)."""
    out, new_res = _launch(x, residual, weight, eps)
    assert new_res is not None  # always allocated when a residual is given
    return out, new_res
