"""Plain-torch reference kernels (CPU and any device)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence


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

    Single-token (decode) sequences are attended together in one padded batch; longer chunks
    (prefill) one by one with a causal mask.
    """
    out = torch.empty_like(q)
    decode = [s for s in seqs if s[1] == 1]
    if decode:
        rows = torch.tensor([s[0] for s in decode], device=q.device)
        out[rows] = _decode_batch(q[rows], k_cache, v_cache, [s[2] for s in decode], scale)
    for q_start, q_len, slots in seqs:
        if q_len == 1:
            continue
        kv_len = slots.shape[0]
        keys = k_cache.index_select(0, slots).transpose(0, 1)[None]  # [1, Hkv, kv_len, hd]
        values = v_cache.index_select(0, slots).transpose(0, 1)[None]
        qi = q[q_start : q_start + q_len].transpose(0, 1)[None]  # [1, Hq, q_len, hd]
        past = kv_len - q_len
        mask = None
        if past > 0:
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(past)
        o = F.scaled_dot_product_attention(
            qi, keys, values, attn_mask=mask, is_causal=past == 0, scale=scale, enable_gqa=True
        )
        out[q_start : q_start + q_len] = o[0].transpose(0, 1)
    return out


def _decode_batch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: list[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """q `[B, Hq, hd]`, one new token per sequence -> `[B, Hq, hd]`."""
    if len(slots) == 1:
        keys = k_cache.index_select(0, slots[0]).transpose(0, 1)[None]
        values = v_cache.index_select(0, slots[0]).transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(
            q[:, :, None], keys, values, scale=scale, enable_gqa=True
        )
        return o[:, :, 0]
    lengths = torch.tensor([s.shape[0] for s in slots], device=q.device)
    padded = pad_sequence(slots, batch_first=True)  # [B, L]; padding reads slot 0, masked below
    width = padded.shape[1]
    flat = padded.flatten()
    b, hkv, hd = len(slots), k_cache.shape[1], k_cache.shape[2]
    keys = k_cache.index_select(0, flat).view(b, width, hkv, hd).transpose(1, 2)  # [B,Hkv,L,hd]
    values = v_cache.index_select(0, flat).view(b, width, hkv, hd).transpose(1, 2)
    valid = torch.arange(width, device=q.device)[None] < lengths[:, None]  # [B, L]
    o = F.scaled_dot_product_attention(
        q[:, :, None], keys, values, attn_mask=valid[:, None, None, :], scale=scale,
        enable_gqa=True,
    )  # fmt: skip
    return o[:, :, 0]  # [B, Hq, hd]
