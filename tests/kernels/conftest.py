"""Kernel tests: Triton kernels against the torch reference, on CUDA when a GPU is present, else
on the CPU under Triton's interpreter.

Triton reads TRITON_INTERPRET when `@triton.jit` decorates a kernel, i.e. when a `triton_*`
module is first imported. This conftest is imported before the test modules beside it, and no
module imports a `triton_*` module at collection time (the registry imports them lazily, and
tests/gpu imports them inside test bodies); `test_interpreter_is_active` checks that it held.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Relative error ‖out − ref‖ / ‖ref‖ against a float64 reference. bf16 is loose on the CPU: the
# interpreter rounds fp32 -> bf16 toward zero (GPUs round to nearest), doubling the store error.
REL_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out64).all(), "non-finite output"
    return ((out64 - ref64).norm() / ref64.norm()).item()
