"""What every Triton kernel wrapper needs: dtype flags that differ between GPU and interpreter."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def interpreting() -> bool:
    """True under `TRITON_INTERPRET=1` (kernels run in numpy on the CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def upcast_tiles(dtype: torch.dtype) -> bool:
    """Whether kernels must turn loaded tiles into fp32 before `tl.dot`.

    Triton's interpreter (3.6-3.9) keeps bf16 as raw uint16 and runs numpy arithmetic and matmul
    on those bits, so bf16 tiles are upcast there; products of bf16 values are exact in fp32, so
    this matches the tensor cores' bf16 x bf16 -> fp32. On a GPU nothing is upcast.
    """
    return interpreting() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use full-precision dots (Triton's default for fp32 is tf32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"Triton kernels support {SUPPORTED_DTYPES}, got {dtype}")
    if any(t.dtype != dtype for t in tensors):
        raise ValueError(f"dtypes differ: {[t.dtype for t in tensors]}")
    return dtype


# Reductions and helpers for the kernels. Triton's own `tl.sum`, `tl.max`, `tl.zeros` and
# `tl.cdiv` are `@triton.jit` functions decorated when triton is first imported; a process that
# imported triton before setting TRITON_INTERPRET=1 (torch._dynamo does, via transformers) cannot
# call them from interpreted kernels. These are decorated when this module is imported, so the
# kernels run both compiled and interpreted; `tl.reduce` with them lowers exactly like `tl.sum`.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def sum_(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _add)


@triton.jit
def max_(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _max)


@triton.jit
def cdiv(a, b):
    return (a + b - 1) // b
