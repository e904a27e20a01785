"""One step's inputs, from rank 0 to every rank, over the group's broadcasts (bounded in time).

Rank 0 alone schedules and embeds; per step it broadcasts what the forward needs and nothing the
workers would have to keep between steps:

    header     int64 [4]          sequences S, tokens T, deepstack width W (0 = none), table blocks
    ints       int64 [3S + B]     per sequence q_len, kv_len and block-table length; the tables
    positions  int64 [3, T]       M-RoPE positions
    embeds     dtype [T, H]       input rows (text embeddings with image rows scattered in)
    deepstack  dtype [T, W]       only when W > 0 (zeros on text rows)

so every rank's forward sees the same rows (image and deepstack embeddings included) and builds
the same attention metadata from the same block tables for its own KV heads.
"""

from __future__ import annotations

import numpy as np
import torch

from services.language.engine.forward_batch import StepInputs, StepSeq
from services.language.parallel.comm import Comm


def send_step(comm: Comm, step: StepInputs) -> None:
    """Rank 0: broadcast `step` (the workers are inside `receive_step`)."""
    seqs, device = step.seqs, comm.device
    width = 0 if step.deepstack is None else step.deepstack.shape[1]
    tables = [s.block_table for s in seqs]
    blocks = sum(len(t) for t in tables)
    header = [len(seqs), step.embeds.shape[0], width, blocks]
    comm.broadcast(torch.tensor(header, dtype=torch.int64, device=device))
    ints = np.empty(3 * len(seqs) + blocks, dtype=np.int64)
    ints[: len(seqs)] = [s.q_len for s in seqs]
    ints[len(seqs) : 2 * len(seqs)] = [s.kv_len for s in seqs]
    ints[2 * len(seqs) : 3 * len(seqs)] = [len(t) for t in tables]
    if blocks:
        ints[3 * len(seqs) :] = np.concatenate([np.asarray(t, dtype=np.int64) for t in tables])
    comm.broadcast(torch.from_numpy(ints).to(device))
    comm.broadcast(step.positions.contiguous())
    comm.broadcast(step.embeds.contiguous())
    if step.deepstack is not None:
        comm.broadcast(step.deepstack.to(step.embeds.dtype).contiguous())


def receive_step(comm: Comm, hidden: int, dtype: torch.dtype) -> StepInputs:
    """A worker: the step rank 0 is sending."""
    device = comm.device
    header = comm.broadcast(torch.empty(4, dtype=torch.int64, device=device)).tolist()
    n, t, width, blocks = header
    ints = comm.broadcast(torch.empty(3 * n + blocks, dtype=torch.int64, device=device))
    values = ints.cpu().numpy()
    q_lens, kv_lens, table_lens = values[:n], values[n : 2 * n], values[2 * n : 3 * n]
    positions = comm.broadcast(torch.empty(3, t, dtype=torch.int64, device=device))
    embeds = comm.broadcast(torch.empty(t, hidden, dtype=dtype, device=device))
    deepstack = None
    if width:
        deepstack = comm.broadcast(torch.empty(t, width, dtype=dtype, device=device))
    seqs, q_start, at = [], 0, 3 * n
    for q_len, kv_len, size in zip(q_lens.tolist(), kv_lens.tolist(), table_lens.tolist(),
                                   strict=True):  # fmt: skip
        seqs.append(StepSeq(q_start, q_len, kv_len, values[at : at + size].tolist()))
        q_start += q_len
        at += size
    return StepInputs(embeds, positions, deepstack, seqs)
