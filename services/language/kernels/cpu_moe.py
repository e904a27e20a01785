"""Fused MoE experts on x86 CPUs: one C++ op (`csrc/cpu_moe.cpp`, built by `cpu_ext`).

The engine's CPU expert kernel when the CPU has AVX-512 (F, BW, VL) and the layer's shapes fit
its tiles (hidden and intermediate sizes multiples of 64), in fp32 or bf16 (bf16 takes
AVX512-BF16's vdpbf16ps where the CPU has it). Measured against `torch_ref.fused_moe`
(`epd bench-cpu-kernels --part moe`, one layer, interleaved): 2.3-3.2x faster in fp32 and
1.3-5.4x in bf16 on the `small` preset's shapes, 2.1-4.3x / 2.2-4.3x on Qwen3-VL-30B-A3B's, at
1-256 tokens; in fp32 within 2.2e-6 of the reference, in bf16 closer to fp32 math than the
reference's own bf16 path.

`pack_experts` stores a layer's weights once, at load, in the kernel's panels, or in the
reference's layout where the kernel cannot take them (shapes, dtype, CPU, or a compiler that
fails: logged once). `fused_moe` reads the layout from the weights' rank, so a layer always runs
the kernel its weights were packed for.
"""

from __future__ import annotations

import torch

from services.language.kernels import torch_ref
from services.language.kernels.cpu_ext import extension, has_bf16_dot, supported

__all__ = ["cpp_moe", "fused_moe", "has_bf16_dot", "pack_experts", "prepare_cpp", "supported"]

TILE = 64  # hidden and intermediate sizes must be multiples of this


def fits(w: torch.Tensor) -> bool:
    """Whether expert weights `[E, N, K]` can be packed for the kernel."""
    _, n, k = w.shape
    dtype_ok = w.dtype == torch.float32 or w.dtype == torch.bfloat16
    return w.device.type == "cpu" and dtype_ok and n % TILE == 0 and k % TILE == 0


def pack_experts(w: torch.Tensor) -> torch.Tensor:
    """`w [E, N, K]` in the layout the CPU kernel reads: 16-column panels `[E, N/16, K, 16]`
    (fp32), k-paired panels `[E, N/16, K/2, 16, 2]` (bf16 on AVX512-BF16 CPUs), or the
    reference's K-major `[E, N, K]` where the kernel cannot take it."""
    if not fits(w) or extension() is None:
        return torch_ref.grouped_mm_layout(w)
    return prepare_cpp(w, dpbf16=_dot(w.dtype))


def fused_moe(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
) -> torch.Tensor:
    """`torch_ref.fused_moe`'s contract on weights from `pack_experts`: x `[T, H]`, router
    weights / experts `[T, K]` -> `[T, H]`."""
    if gate_up_proj.ndim == 3:  # not packed (see pack_experts)
        return torch_ref.fused_moe(x, gate_up_proj, down_proj, weights, experts)
    return cpp_moe(x, gate_up_proj, down_proj, weights, experts, dpbf16=gate_up_proj.ndim == 5)


def _dot(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and has_bf16_dot()


def prepare_cpp(w: torch.Tensor, dpbf16: bool = False) -> torch.Tensor:
    """`w [E, N, K]` -> 16-column panels `[E, N/16, K, 16]` (one 64-byte row per k), or with
    `dpbf16` k-pairs `[E, N/16, K/2, 16, 2]` for vdpbf16ps."""
    e, n, k = w.shape
    if n % TILE or k % 2:
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
    module = extension()
    if module is None:
        raise RuntimeError("the C++ CPU kernels are not available on this machine")
    out: torch.Tensor = module.fused_moe(  # type: ignore[attr-defined]
        x.contiguous(), gate_up_packed, down_packed, weights, experts, dpbf16
    )
    return out
