"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed over static buffers.

A decode-only step (each sequence adds one generated token) launches the same few hundred
kernels with the same shapes whenever its batch size is the same, so the decoder forward is
captured once per bucket of batch sizes (1, 2, 4, 8, then every 8 up to the largest) and replayed:
one launch instead of hundreds, which is most of a small batch's step time. A step of B
sequences replays the smallest bucket >= B; rows B.. are padding. Prefill and mixed steps, and
batches above the largest bucket, run eagerly. lm_head and sampling stay outside the graph, on the
real rows only.

Invariants of the captured region (`DecodeGraphs._forward`), checked on the CPU by
tests/kernels/test_cuda_graphs.py:
- every input lives in a static buffer below, written before each replay; shapes, grids and
  kernel arguments depend on the bucket only;
- no host read of device data (`.item()`, `.tolist()`, `torch.bincount`, `torch.nonzero`,
  boolean-mask indexing): the Triton decode attention takes its split count from the bucket and
  each sequence's split length from its length on the device; the MoE alignment pads to the
  worst case for bucket * top_k routed rows;
- no deepstack: generated tokens carry none (their deepstack rows are zeros).

Static buffers (Bmax = largest bucket, W = blocks of the longest possible sequence):

    embeds       [Bmax, H]   embedding of each sequence's new token
    positions    [3, Bmax]   its M-RoPE position (three equal rows: generated tokens are text)
    slot_mapping [Bmax]      KV slot its K/V are written to
    block_table  [Bmax, W]   int32 KV blocks of each sequence (read below its length only)
    lengths      [Bmax]      int32 tokens cached, the new one included (>= 1)
    hidden       [Bmax, H]   the decoder's output, before the final norm

Padding rows write and read only the reserved pad block (slot pad_block * block_size, length 1,
position 0), which the block manager never hands out, so they cannot touch a real sequence.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from services.language.engine.forward_batch import KVStorage
from services.language.kernels import backend_for
from services.language.model import Qwen3MoeForCausalLM

log = logging.getLogger(__name__)

ENV_VAR = "EPD_CUDA_GRAPHS"  # "0" / "1": overrides the configured choice
# Above this many sequences a step is long enough that launch gaps matter little: eager.
MAX_GRAPH_BATCH = 256


def graphs_enabled(requested: bool, device: torch.device) -> bool:
    """Whether decode steps use CUDA graphs: `$EPD_CUDA_GRAPHS` (0/1) else `requested`, and only
    on CUDA with the Triton kernels (the torch reference kernels read counts back to the host)."""
    env = os.environ.get(ENV_VAR)
    if env not in (None, "", "0", "1"):
        raise ValueError(f"{ENV_VAR} must be 0 or 1, got {env!r}")
    wanted = env == "1" if env else requested
    if not wanted or device.type != "cuda":
        return False
    if backend_for(device) != "triton":
        log.warning("CUDA graphs need the Triton kernels; decode steps run eagerly")
        return False
    return True


def graph_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """Captured batch sizes: 1, 2, 4, 8, then every 8, up to and including `max_batch`."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    small = [s for s in (1, 2, 4, 8) if s < max_batch]
    return (*small, *range(16, max_batch, 8), max_batch)


def bucket_for(num_seqs: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest captured size that holds `num_seqs` sequences; None above the largest."""
    return next((s for s in sizes if s >= num_seqs), None)


@dataclass(frozen=True)
class DecodeStep:
    """Host-side inputs of one decode step, one entry per sequence (in row order)."""

    positions: list[int]  # text position of the new token (rope delta applied)
    slots: list[int]  # KV slot of the new token
    lengths: list[int]  # tokens cached, the new one included
    block_tables: list[list[int]]  # each sequence's KV blocks


class StaticDecodeBatch:
    """Attention of a decode-only batch over static metadata (implements `AttentionBackend`):
    writes each row's K/V to its slot, then the Triton decode kernel reads the block tables."""

    def __init__(self, storage: KVStorage, slot_mapping: torch.Tensor, meta: object) -> None:
        self.storage, self.slot_mapping, self.meta = storage, slot_mapping, meta

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        from services.language.kernels import triton_attention

        assert isinstance(self.meta, triton_attention.DecodeMeta)
        k_cache, v_cache = self.storage.k[layer], self.storage.v[layer]
        k_cache.index_copy_(0, self.slot_mapping, k)
        v_cache.index_copy_(0, self.slot_mapping, v)
        return triton_attention.decode_attention(q, k_cache, v_cache, self.meta, scale)


class DecodeGraphs:
    """Static buffers, and one captured decoder forward per bucket (see the module docstring).

    With `capture=False` nothing is captured and `run` executes the same padded forward eagerly:
    that is how the CPU tests check padding and graph-safety without a GPU.
    """

    def __init__(
        self,
        model: Qwen3MoeForCausalLM,
        storage: KVStorage,
        pad_block: int,
        max_blocks: int,
        max_batch: int,
        capture: bool = True,
    ) -> None:
        from services.language.kernels import triton_attention

        self.model, self.storage = model, storage
        self.sizes = graph_batch_sizes(min(max_batch, MAX_GRAPH_BATCH))
        self.block_size = storage.block_size
        self.pad_block, self.max_blocks = pad_block, max_blocks
        self.pad_slot = pad_block * storage.block_size
        device, bmax = storage.k.device, self.sizes[-1]
        hidden = model.model.cfg.hidden_size
        dtype = model.model.embed_tokens.weight.dtype
        self.embeds = torch.zeros(bmax, hidden, dtype=dtype, device=device)
        self.positions = torch.zeros(3, bmax, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((bmax,), self.pad_slot, dtype=torch.long, device=device)
        self.block_table = torch.full(
            (bmax, max_blocks), pad_block, dtype=torch.int32, device=device
        )
        self.lengths = torch.ones(bmax, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(bmax, hidden, dtype=dtype, device=device)
        max_splits = -(-(max_blocks * self.block_size) // triton_attention.BLOCK_N)  # ceil
        num_kv_heads = storage.k.shape[2]
        self.num_splits = {
            bs: min(max_splits, triton_attention.num_splits_for(bs, num_kv_heads, device))
            for bs in self.sizes
        }
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.num_replays = 0
        if capture:
            self._capture()

    def fits(self, num_seqs: int, num_blocks: int) -> bool:
        return num_seqs <= self.sizes[-1] and num_blocks <= self.max_blocks

    def run(self, embeds: torch.Tensor, step: DecodeStep) -> torch.Tensor:
        """embeds `[B, H]` of the new tokens -> hidden states `[B, H]` (a view of the static
        output buffer, valid until the next call)."""
        n = embeds.shape[0]
        bs = bucket_for(n, self.sizes)
        width = max(len(t) for t in step.block_tables)
        if bs is None or width > self.max_blocks or len(step.lengths) != n:
            raise ValueError(f"{n} sequences / {width} blocks do not fit the captured graphs")
        # One host array, one copy to the device: per row [position, slot, length, blocks...];
        # padding rows read only the pad block. Filled by numpy row slices, not one nested
        # Python list: at 64 sequences x 2048 blocks that list cost milliseconds per step.
        host = np.full((bs, 3 + width), self.pad_block, dtype=np.int64)
        host[:, :3] = (0, self.pad_slot, 1)
        host[:n, 0], host[:n, 1], host[:n, 2] = step.positions, step.slots, step.lengths
        for row, table in zip(host, step.block_tables, strict=False):
            row[3 : 3 + len(table)] = table
        meta = torch.from_numpy(host).to(self.embeds.device)  # [bs, 3 + width]
        self.embeds[:n].copy_(embeds)
        self.positions[:, :bs].copy_(meta[:, 0].expand(3, -1))
        self.slot_mapping[:bs].copy_(meta[:, 1])
        self.lengths[:bs].copy_(meta[:, 2])
        self.block_table[:bs, :width].copy_(meta[:, 3:])
        graph = self.graphs.get(bs)
        if graph is not None:
            graph.replay()
            self.num_replays += 1
        else:
            self._forward(bs)
        return self.hidden[:n]

    def _forward(self, bs: int) -> None:
        """The captured region: the decoder over the first `bs` rows of the static buffers."""
        from services.language.kernels import triton_attention

        meta = triton_attention.DecodeMeta(
            rows=None,
            table=self.block_table[:bs],
            lengths=self.lengths[:bs],
            num_splits=self.num_splits[bs],
            page=self.block_size,
        )
        batch = StaticDecodeBatch(self.storage, self.slot_mapping[:bs], meta)
        self.hidden[:bs] = self.model(self.embeds[:bs], self.positions[:, :bs], batch)

    @torch.inference_mode()
    def _capture(self) -> None:
        """Largest bucket first, all in one memory pool (smaller graphs reuse its blocks), as
        nano-vLLM and SGLang do. Each bucket runs once eagerly first so that Triton compiles its
        kernels (and the rotary cache fills) outside the capture. The static buffers still hold
        padding only, so warm-up and capture touch nothing but the pad block."""
        device = self.embeds.device
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):
            self._forward(bs)
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(bs)
            self.graphs[bs] = graph
        torch.cuda.synchronize(device)
        log.info("captured decode CUDA graphs for batch sizes %s", ",".join(map(str, self.sizes)))
