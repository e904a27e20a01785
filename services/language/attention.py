"""Attention backends: where the decoder's K/V live and how a forward attends over them.

The decoder calls `backend.attend(layer, q, k, v)` once per layer with the new tokens' projections
(q/k already normed and rotated). A backend stores the new K/V and returns the attention output.
`ContiguousKVCache` serves one sequence with a preallocated cache (the in-process `epd generate`
path); the paged multi-sequence backend of the engine implements the same protocol.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionBackend(Protocol):
    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """q `[T, Hq, hd]`, k/v `[T, Hkv, hd]` for this forward's T new tokens -> `[T, Hq, hd]`."""
        ...


class ContiguousKVCache:
    """K/V of a single sequence in `[layers, Hkv, max_len, hd]` buffers.

    One forward = one call to `attend` per layer with the same T new tokens, then `commit(T)`.
    New tokens attend causally to everything cached plus themselves.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # tokens committed so far

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        t = q.shape[0]
        start, end = self.length, self.length + t
        if end > self.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the KV cache ({self.max_len})")
        self.k[layer, :, start:end] = k.transpose(0, 1)
        self.v[layer, :, start:end] = v.transpose(0, 1)
        keys, values = self.k[layer, :, :end], self.v[layer, :, :end]  # [Hkv, end, hd]
        qh = q.transpose(0, 1)  # [Hq, T, hd]
        mask = None
        if t > 1 and start > 0:
            # Query i sits at absolute position start+i and sees keys 0..start+i.
            mask = torch.ones(t, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        # 4-D inputs: CPU SDPA takes its fused kernel only for batched shapes.
        out = F.scaled_dot_product_attention(
            qh[None],
            keys[None],
            values[None],
            attn_mask=mask,
            is_causal=t > 1 and start == 0,
            scale=scale,
            enable_gqa=True,
        )[0]
        return out.transpose(0, 1)  # [T, Hq, hd]

    def commit(self, num_tokens: int) -> None:
        self.length += num_tokens
