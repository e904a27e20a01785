"""Paged attention on CPUs with the C++ kernels: decode rows read the paged cache in place
(`csrc/cpu_attention.cpp`); prefill chunks go through the torch reference (SDPA over the
gathered context, which their queries amortise).

The torch reference gathers every decode row's whole context into a padded copy and masks it;
reading in place measured 1.5-3.2x faster at a context of 128 and 2.5-6x at 1024 for batches of
8-32 (`epd bench-cpu-kernels --part attention`, the small and A3B shapes).
"""

from __future__ import annotations

import torch

from services.language.kernels import TorchAttention, torch_ref
from services.language.kernels.cpu_ext import extension


class CpuAttention(TorchAttention):
    """The `AttentionKernel` of the CPU backend: the torch reference's metadata (`prepare`) and
    its prefill path, decode rows through the C++ kernel."""

    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: object,
        scale: float,
    ) -> torch.Tensor:
        assert isinstance(meta, torch_ref.PagedMeta)  # built by prepare
        module = extension()
        hq, hd = q.shape[1], q.shape[2]
        fits = hd % 16 == 0 and hd <= 256 and hq // k_cache.shape[1] <= 16
        if module is None or meta.decode_rows is None or not fits:
            return super().__call__(q, k_cache, v_cache, meta, scale)
        assert meta.decode_slots is not None and meta.decode_lens is not None
        prefill_only = torch_ref.PagedMeta(None, None, None, meta.prefill)
        out = torch_ref.paged_attention(q, k_cache, v_cache, prefill_only, scale)
        rows = meta.decode_rows
        slots = meta.decode_slots.view(rows.shape[0], -1)  # [B, L]
        out[rows] = module.decode_attention(q[rows], k_cache, v_cache, slots, meta.decode_lens,
                                            scale)  # fmt: skip
        return out
