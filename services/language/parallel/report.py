"""What each rank holds, reported at start-up: the split should give every rank ~1/N of the
sharded weights plus the replicated ones (and rank 0 the embeddings and lm_head)."""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankMemory:
    rank: int
    weight_bytes: int  # the rank's parameters
    peak_rss_bytes: int  # the process's peak resident memory so far
    device_bytes: int  # CUDA memory allocated on the rank's device (0 on CPU)

    @classmethod
    def of(cls, rank: int, model: nn.Module, device: torch.device) -> RankMemory:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        on_device = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        return cls(rank, weights, peak_rss_bytes(), on_device)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def log_ranks(ranks: list[RankMemory]) -> None:
    for r in sorted(ranks, key=lambda r: r.rank):
        log.info(
            "rank %d: weights %.1f MiB, peak RSS %.1f MiB, device %.1f MiB",
            r.rank, r.weight_bytes / 2**20, r.peak_rss_bytes / 2**20, r.device_bytes / 2**20,
        )  # fmt: skip
