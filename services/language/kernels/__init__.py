"""Compute kernels of the decoder behind small interfaces, chosen by device (never by model name).

`torch_ref` holds the plain-torch reference implementations, which run everywhere
and define the expected results. The `triton_*` modules hold the GPU kernels, imported lazily and
chosen for CUDA tensors when Triton is installed. `cpu_moe`, `cpu_attention` and `cpu_norm` hold
the C++ expert, paged-attention and norm / rotary kernels (`cpu_ext` builds them), chosen for CPU
tensors on CPUs with AVX-512 where they build (long prefill chunks' attention stays the
reference).
`EPD_KERNELS=torch|triton|cpu` (or `force=`) picks one for every device; forcing Triton on a CPU
tensor works only under `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from typing import Literal, Protocol

import torch

from services.language.kernels import torch_ref
from services.language.kernels.torch_ref import paged_attention

Backend = Literal["torch", "triton", "cpu"]
BACKENDS: tuple[Backend, ...] = ("torch", "triton", "cpu")
ENV_VAR = "EPD_KERNELS"

Seqs = list[tuple[int, int, torch.Tensor]]  # (q_start, q_len, kv_slots) per sequence


class MoeFn(Protocol):
    def __call__(
        self,
        x: torch.Tensor,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        weights: torch.Tensor,
        experts: torch.Tensor,
    ) -> torch.Tensor: ...


class NormFn(Protocol):
    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...


class AddNormFn(Protocol):
    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class QkNormRopeFn(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        q_weight: torch.Tensor,
        k_weight: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        heads: tuple[int, int],
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class AttentionKernel(Protocol):
    """Paged attention: `prepare` once per forward (metadata shared by all layers, from the
    sequences or from the `torch_ref.PagedMeta` the runner built for the step), then one call per
    layer with that layer's K/V cache `[slots, Hkv, hd]` (the new tokens already written)."""

    def prepare(
        self, seqs: Seqs | torch_ref.PagedMeta, num_kv_heads: int, device: torch.device
    ) -> object: ...

    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: object,
        scale: float,
    ) -> torch.Tensor: ...


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend_for(device: torch.device, force: str | None = None) -> Backend:
    """`force`, else `$EPD_KERNELS`, else Triton for CUDA tensors when installed, the C++ CPU
    kernels for CPU tensors on AVX-512 CPUs, else torch."""
    choice = force or os.environ.get(ENV_VAR) or None
    if choice is None:
        if device.type == "cuda":
            return "triton" if triton_available() else "torch"
        return "cpu" if device.type == "cpu" and cpu_kernels_supported() else "torch"
    if choice not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {choice!r}")
    return choice  # type: ignore[return-value]


def cpu_kernels_supported() -> bool:
    from services.language.kernels import cpu_ext

    return cpu_ext.supported() and cpu_ext.extension() is not None


def moe_kernel(device: torch.device, force: str | None = None) -> MoeFn:
    backend = backend_for(device, force)
    if backend == "triton":
        from services.language.kernels import triton_moe

        return triton_moe.fused_moe
    if backend == "cpu":
        from services.language.kernels import cpu_moe

        return cpu_moe.fused_moe
    return torch_ref.fused_moe


def moe_weight_layout(
    device: torch.device, force: str | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """How the MoE kernel wants expert weights `[E, N, K]` stored (applied once, at load)."""
    backend = backend_for(device, force)
    if backend == "triton":
        return lambda w: w  # the Triton kernels read tiles K-contiguous from the row-major layout
    if backend == "cpu":
        from services.language.kernels import cpu_moe

        return cpu_moe.pack_experts
    return torch_ref.grouped_mm_layout


def rms_norm_kernel(device: torch.device, force: str | None = None) -> NormFn:
    backend = backend_for(device, force)
    if backend == "triton":
        from services.language.kernels import triton_norm

        return triton_norm.rms_norm
    if backend == "cpu":
        from services.language.kernels import cpu_norm

        return cpu_norm.rms_norm
    return torch_ref.rms_norm


def add_rms_norm_kernel(device: torch.device, force: str | None = None) -> AddNormFn:
    backend = backend_for(device, force)
    if backend == "triton":
        from services.language.kernels import triton_norm

        return triton_norm.add_rms_norm
    if backend == "cpu":
        from services.language.kernels import cpu_norm

        return cpu_norm.add_rms_norm
    return torch_ref.add_rms_norm


def qk_norm_rope_kernel(device: torch.device, force: str | None = None) -> QkNormRopeFn:
    """The attention's per-head q/k RMSNorm + rotary embedding: one C++ pass on CPU, else the
    torch ops around the backend's RMSNorm."""
    if backend_for(device, force) == "cpu":
        from services.language.kernels import cpu_norm

        return cpu_norm.qk_norm_rope
    return functools.partial(torch_ref.qk_norm_rope, norm=rms_norm_kernel(device, force))


class TorchAttention:
    def prepare(
        self, seqs: Seqs | torch_ref.PagedMeta, num_kv_heads: int, device: torch.device
    ) -> object:
        return seqs if isinstance(seqs, torch_ref.PagedMeta) else torch_ref.prepare_paged(seqs)

    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: object,
        scale: float,
    ) -> torch.Tensor:
        assert isinstance(meta, torch_ref.PagedMeta)  # built by prepare
        return torch_ref.paged_attention(q, k_cache, v_cache, meta, scale)


class TritonAttention:
    """Decode rows through the Triton paged kernel; prefill chunks through the torch reference."""

    def prepare(
        self, seqs: Seqs | torch_ref.PagedMeta, num_kv_heads: int, device: torch.device
    ) -> object:
        from services.language.kernels import triton_attention

        return triton_attention.prepare(seqs, num_kv_heads, device)

    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: object,
        scale: float,
    ) -> torch.Tensor:
        from services.language.kernels import triton_attention

        assert isinstance(meta, triton_attention.Meta)  # built by prepare
        return triton_attention.paged_attention(q, k_cache, v_cache, meta, scale)


def attention_kernel(device: torch.device, force: str | None = None) -> AttentionKernel:
    backend = backend_for(device, force)
    if backend == "triton":
        return TritonAttention()
    if backend == "cpu":
        from services.language.kernels.cpu_attention import CpuAttention

        return CpuAttention()
    return TorchAttention()


__all__ = [
    "ENV_VAR",
    "AttentionKernel",
    "add_rms_norm_kernel",
    "attention_kernel",
    "backend_for",
    "moe_kernel",
    "moe_weight_layout",
    "paged_attention",
    "qk_norm_rope_kernel",
    "rms_norm_kernel",
]
