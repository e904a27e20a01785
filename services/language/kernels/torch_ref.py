"""Plain-torch reference kernels (CPU and any device)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqs: list[tuple[int, int, torch.Tensor]],
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached K/V.

    q `[T, Hq, hd]` holds the new tokens of all sequences back to back; `k_cache`/`v_cache`
    `[slots, Hkv, hd]` hold one layer's cache. `seqs[i] = (q_start, q_len, kv_slots)` with
    `kv_slots [kv_len]` the slots of the sequence's tokens 0..kv_len-1 (new ones included, already
    written). New token j of a sequence sits at position kv_len - q_len + j. Returns `[T, Hq, hd]`.
    """
    out = torch.empty_like(q)
    for q_start, q_len, slots in seqs:
        kv_len = slots.shape[0]
        keys = k_cache.index_select(0, slots).transpose(0, 1)[None]  # [1, Hkv, kv_len, hd]
        values = v_cache.index_select(0, slots).transpose(0, 1)[None]
        qi = q[q_start : q_start + q_len].transpose(0, 1)[None]  # [1, Hq, q_len, hd]
        past = kv_len - q_len
        mask = None
        if q_len > 1 and past > 0:
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(past)
        o = F.scaled_dot_product_attention(
            qi, keys, values, attn_mask=mask, is_causal=q_len > 1 and past == 0, scale=scale,
            enable_gqa=True,
        )  # fmt: skip
        out[q_start : q_start + q_len] = o[0].transpose(0, 1)
    return out
