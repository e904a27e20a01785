"""Per-step attention metadata over the paged KV cache (implements `AttentionBackend`).

Built by the model runner for one forward: where each new token's K/V goes (`slot_mapping`) and,
per sequence, which slots hold its tokens. The decoder calls `attend` once per layer.

`step_metadata` builds it from the sequences' block tables on the host with numpy, in one pass:
the decode rows' slots as one padded `[B, L]` matrix (a gather of their padded block tables), the
prefill chunks' slots one array each, and the new tokens' slots. Per sequence and per step that
is a few numpy operations instead of a handful of small torch ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from services.language.kernels import attention_kernel
from services.language.kernels.torch_ref import PagedMeta

if TYPE_CHECKING:
    from services.language.model import Qwen3MoeForCausalLM


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
        return torch.from_numpy(_slots(block_table, num_tokens, self.block_size)).to(device)


@dataclass(frozen=True, slots=True)
class StepSeq:
    """One sequence of a step: its new tokens are rows q_start..q_start+q_len-1 of the forward
    and its tokens kv_len-q_len..kv_len-1."""

    q_start: int
    q_len: int
    kv_len: int
    block_table: list[int]


@dataclass(frozen=True)
class StepInputs:
    """What one eager forward takes: the same on every tensor-parallel rank."""

    embeds: torch.Tensor  # [T, H]
    positions: torch.Tensor  # [3, T] int64
    deepstack: torch.Tensor | None  # [T, D*H], zeros on text rows
    seqs: list[StepSeq]  # in row order


def forward_step(
    model: Qwen3MoeForCausalLM, storage: KVStorage, block_size: int, step: StepInputs
) -> torch.Tensor:
    """The decoder over the step's rows, K/V written into `storage`: hidden states `[T, H]`."""
    meta = step_metadata(step.seqs, block_size, storage.k.device)
    return model(step.embeds, step.positions, ForwardBatch(storage, step=meta), step.deepstack)


def step_metadata(
    seqs: list[StepSeq], block_size: int, device: torch.device
) -> tuple[PagedMeta, torch.Tensor]:
    """The step's attention metadata and `slot_mapping [T]` (the new tokens' slots, row order;
    `seqs` are in row order)."""
    decode = [s for s in seqs if s.q_len == 1]
    new_slots: list[np.ndarray] = []
    prefill: list[tuple[int, int, torch.Tensor]] = []
    decode_slots = None
    for s in seqs:
        if s.q_len == 1:
            pos = s.kv_len - 1
            new_slots.append(np.array([s.block_table[pos // block_size] * block_size
                                       + pos % block_size]))  # fmt: skip
            continue
        kv = _slots(s.block_table, s.kv_len, block_size)
        new_slots.append(kv[-s.q_len :])
        prefill.append((s.q_start, s.q_len, torch.from_numpy(kv).to(device)))
    slot_mapping = torch.from_numpy(np.concatenate(new_slots)).to(device)
    if not decode:
        return PagedMeta(None, None, None, prefill), slot_mapping
    lens = np.array([s.kv_len for s in decode], dtype=np.int64)
    width = int(lens.max())
    blocks = -(-width // block_size)
    tables = np.zeros((len(decode), blocks), dtype=np.int64)
    for i, s in enumerate(decode):
        n = min(blocks, len(s.block_table))
        tables[i, :n] = s.block_table[:n]
    t = np.arange(width)
    decode_slots = tables[:, t // block_size] * block_size + t % block_size  # [B, L]
    valid = torch.from_numpy(t[None] < lens[:, None]).to(device)
    rows = torch.tensor([s.q_start for s in decode], device=device)
    meta = PagedMeta(
        rows,
        torch.from_numpy(decode_slots.reshape(-1)).to(device),
        valid[:, None, None, :],
        prefill,
        torch.from_numpy(lens).to(device),
        width,
    )
    return meta, slot_mapping


def _slots(block_table: list[int], num_tokens: int, block_size: int) -> np.ndarray:
    t = np.arange(num_tokens)
    return np.asarray(block_table, dtype=np.int64)[t // block_size] * block_size + t % block_size


class ForwardBatch:
    def __init__(
        self,
        storage: KVStorage,
        seqs: list[tuple[int, int, torch.Tensor]] | None = None,
        step: tuple[PagedMeta, torch.Tensor] | None = None,
    ) -> None:
        """Either `seqs[i] = (q_start, q_len, kv_slots)`: sequence i's new tokens are rows
        q_start..q_start+q_len-1 of the forward and the last q_len entries of `kv_slots`; or the
        `step_metadata` of the step."""
        self.storage = storage
        device = storage.k.device
        self.attention = attention_kernel(device)
        if step is not None:
            meta, self.slot_mapping = step
            self.attention_meta = self.attention.prepare(meta, storage.k.shape[2], device)
            return
        assert seqs is not None
        self.slot_mapping = torch.cat([slots[-q_len:] for _, q_len, slots in seqs])  # [T]
        self.attention_meta = self.attention.prepare(seqs, storage.k.shape[2], device)

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        k_cache, v_cache = self.storage.k[layer], self.storage.v[layer]
        k_cache.index_copy_(0, self.slot_mapping, k)
        v_cache.index_copy_(0, self.slot_mapping, v)
        return self.attention(q, k_cache, v_cache, self.attention_meta, scale)
