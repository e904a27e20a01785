"""Paged attention on CPUs with the C++ kernel (`csrc/cpu_attention.cpp`): query rows read the
paged cache in place, each row one token with the keys it may see.

The torch reference gathers every decode row's whole context into a padded copy and masks it;
reading in place measured 1.5-3.2x faster at a context of 128 and 2.5-6x at 1024 for batches of
8-32 (`epd bench-cpu-kernels --part attention`, the small and A3B shapes). The reference also
runs one SDPA per prefill chunk, per layer: a step prefilling 32 prompts of 48 tokens spent
22.6 ms of its 292-310 (8 layers) there, 10.5 ms through the kernel. So when every prefill
chunk of a step is short (`MAX_ROW_CONTEXT`), each of its tokens becomes a row of the same kernel
call as the decode rows (causal: a row sees the keys up to its own position). Longer chunks go
to SDPA, which tiles queries against keys, while the decode rows stay on the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from services.language.kernels import Seqs, TorchAttention, torch_ref
from services.language.kernels.cpu_ext import extension

# Longest prefill chunk context (tokens) whose rows go through the kernel: one row reads its
# keys alone (no reuse across queries), which SDPA beats on long chunks.
MAX_ROW_CONTEXT = 256


@dataclass(frozen=True)
class RowsMeta:
    """Every row of the step as one query: row r sees the first `lens[r]` slots of sequence
    `seq[r]` (decode sequences first, then the prefill chunks)."""

    slots: torch.Tensor  # [S, W] int64, padded with slot 0
    lens: torch.Tensor  # [R] int64
    seq: torch.Tensor  # [R] int64
    paged: torch_ref.PagedMeta  # the same step for the reference path


class CpuAttention(TorchAttention):
    """The `AttentionKernel` of the CPU backend: the torch reference's metadata (`prepare`), every
    row through the C++ kernel when the step's prefill chunks are short, else decode rows through
    it and prefill chunks through the reference."""

    def prepare(self, seqs: Seqs | torch_ref.PagedMeta, num_kv_heads: int,
                device: torch.device) -> object:  # fmt: skip
        meta = super().prepare(seqs, num_kv_heads, device)
        assert isinstance(meta, torch_ref.PagedMeta)
        if device.type != "cpu" or any(s.shape[0] > MAX_ROW_CONTEXT for _, _, s in meta.prefill):
            return meta
        return rows_meta(meta)

    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: object,
        scale: float,
    ) -> torch.Tensor:
        rows = meta if isinstance(meta, RowsMeta) else None
        paged = rows.paged if rows is not None else meta
        assert isinstance(paged, torch_ref.PagedMeta)  # built by prepare
        module = extension()
        hq, hd = q.shape[1], q.shape[2]
        fits = hd % 16 == 0 and hd <= 256 and hq // k_cache.shape[1] <= 16
        if module is None or not fits:
            return super().__call__(q, k_cache, v_cache, paged, scale)
        if rows is not None:
            assert rows.lens.shape[0] == q.shape[0]  # every row of the step is in the metadata
            out: torch.Tensor = module.paged_attention_rows(
                q, k_cache, v_cache, rows.slots, rows.lens, rows.seq, scale
            )
            return out
        if paged.decode_rows is None:
            return super().__call__(q, k_cache, v_cache, paged, scale)
        assert paged.decode_slots is not None and paged.decode_lens is not None
        prefill_only = torch_ref.PagedMeta(None, None, None, paged.prefill)
        out = torch_ref.paged_attention(q, k_cache, v_cache, prefill_only, scale)
        idx = paged.decode_rows
        slots = paged.decode_slots.view(idx.shape[0], -1)  # [B, L]
        out[idx] = module.paged_attention_rows(q[idx], k_cache, v_cache, slots,
                                               paged.decode_lens, _NO_SEQ, scale)  # fmt: skip
        return out


_NO_SEQ = torch.empty(0, dtype=torch.int64)  # row r reads slots row r


def rows_meta(meta: torch_ref.PagedMeta) -> RowsMeta:
    """The step's rows for the kernel, from the reference's metadata (CPU tensors)."""
    b = 0 if meta.decode_rows is None else meta.decode_rows.shape[0]
    rows = b + sum(q_len for _, q_len, _ in meta.prefill)
    width = max([meta.decode_max_len, *(s.shape[0] for _, _, s in meta.prefill)])
    slots = np.zeros((b + len(meta.prefill), width), dtype=np.int64)
    lens = np.empty(rows, dtype=np.int64)
    seq = np.empty(rows, dtype=np.int64)
    if meta.decode_rows is not None:
        assert meta.decode_slots is not None and meta.decode_lens is not None
        idx = meta.decode_rows.numpy()
        slots[:b, : meta.decode_max_len] = meta.decode_slots.view(b, -1).numpy()
        lens[idx] = meta.decode_lens.numpy()
        seq[idx] = np.arange(b)
    for i, (q_start, q_len, kv) in enumerate(meta.prefill):
        kv_len = kv.shape[0]
        slots[b + i, :kv_len] = kv.numpy()
        lens[q_start : q_start + q_len] = np.arange(kv_len - q_len + 1, kv_len + 1)
        seq[q_start : q_start + q_len] = b + i
    return RowsMeta(torch.from_numpy(slots), torch.from_numpy(lens), torch.from_numpy(seq), meta)
