"""Per-step attention metadata over the paged KV cache (implements `AttentionBackend`).

Built by the model runner for one forward: where each new token's K/V goes (`slot_mapping`) and,
per sequence, which slots hold its tokens. The decoder calls `attend` once per layer.
"""

from __future__ import annotations

import torch

from services.language.kernels import attention_kernel


class KVStorage:
    """K and V of every layer: `[layers, num_blocks * block_size, Hkv, hd]` each."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * elem

    def slots(self, block_table: list[int], num_tokens: int, device: torch.device) -> torch.Tensor:
        """Slots of tokens 0..num_tokens-1 of a sequence with this block table."""
        idx = torch.arange(num_tokens, device=device)
        table = torch.tensor(block_table, dtype=torch.long, device=device)
        return table[idx // self.block_size] * self.block_size + idx % self.block_size


class ForwardBatch:
    def __init__(self, storage: KVStorage, seqs: list[tuple[int, int, torch.Tensor]]) -> None:
        """`seqs[i] = (q_start, q_len, kv_slots)`: sequence i's new tokens are rows
        q_start..q_start+q_len-1 of the forward and the last q_len entries of `kv_slots`."""
        self.storage = storage
        self.seqs = seqs
        self.slot_mapping = torch.cat([slots[-q_len:] for _, q_len, slots in seqs])  # [T]
        device = storage.k.device
        self.attention = attention_kernel(device)
        self.attention_meta = self.attention.prepare(seqs, storage.k.shape[2], device)

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        k_cache, v_cache = self.storage.k[layer], self.storage.v[layer]
        k_cache.index_copy_(0, self.slot_mapping, k)
        v_cache.index_copy_(0, self.slot_mapping, v)
        return self.attention(q, k_cache, v_cache, self.attention_meta, scale)
