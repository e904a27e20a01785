"""Triton RMSNorm (plain and with the residual add fused) against the torch reference."""

from __future__ import annotations

import pytest
import torch

from services.language.kernels import torch_ref
from services.language.kernels.triton_norm import add_rms_norm, rms_norm
from tests.kernels.conftest import DEVICE, REL_TOL, rel_err

SHAPES = [(7, 33), (2, 3, 24), (1, 128)]  # odd width; q/k-norm style [T, heads, hd]; decode row
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def inputs(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    x, residual = torch.randn(shape) * 3, torch.randn(shape)
    weight = torch.rand(shape[-1]) + 0.5
    return tuple(a.to(DEVICE, dtype) for a in (x, residual, weight))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm(shape, dtype) -> None:
    torch.manual_seed(len(shape))
    x, _, weight = inputs(shape, dtype)
    ref = torch_ref.rms_norm(x.cpu().double(), weight.cpu().double(), 1e-6)
    out = rms_norm(x, weight, 1e-6)
    assert out.shape == x.shape and out.dtype == dtype
    assert rel_err(out, ref) < REL_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_rms_norm(shape, dtype) -> None:
    torch.manual_seed(10 + len(shape))
    x, residual, weight = inputs(shape, dtype)
    ref_out, ref_res = torch_ref.add_rms_norm(
        x.cpu().double(), residual.cpu().double(), weight.cpu().double(), 1e-6
    )
    out, new_res = add_rms_norm(x, residual, weight, 1e-6)
    assert rel_err(new_res, ref_res) < REL_TOL[dtype]
    assert rel_err(out, ref_out) < REL_TOL[dtype]
    if dtype != torch.bfloat16:  # (the interpreter truncates bf16; GPUs round like torch)
        # the residual stream is rounded to the model dtype exactly as `residual + x` rounds it
        assert torch.equal(new_res.cpu(), (residual + x).cpu())


def test_rejects_mismatched_weight() -> None:
    x, _, weight = inputs((2, 16), torch.float32)
    with pytest.raises(ValueError, match="shapes disagree"):
        rms_norm(x, weight[:8], 1e-6)
