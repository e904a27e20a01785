"""Encoder output cache: wire tensors by key, LRU-bounded in bytes, plus in-flight de-duplication.

Keys are a hash of the image bytes and the preprocessing settings (see `Encoder.cache_key`), so
one entry serves every request that sends the same file. Values are private CPU copies of the
wire tensor (never pool memory): a hit is republished into the pool under a new handle.

`Pending` is an image being encoded right now; a request for the same key joins it instead of
running the tower again. Everything here runs on the event loop thread (no locks).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from services.encoder.video import VideoChunk

Grid = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class CachedImage:
    tensor: torch.Tensor  # [n_tokens, (1+D)*H] on the CPU, contiguous, model dtype
    grid_thw: Grid  # in patches, before the merge
    preprocess_s: float = 0.0  # how long producing it took: decode/resize/patchify
    forward_s: float = 0.0  # batching wait plus the tower forward
    chunk: VideoChunk | None = None  # a video's temporal patches: timestamps and extent


class TensorCache:
    """Least-recently-used entries are evicted once the tensors' bytes exceed `capacity_bytes`.
    A capacity of 0 disables caching; an entry larger than the capacity is not stored."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"cache capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, CachedImage] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CachedImage | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: CachedImage) -> None:
        size = _nbytes(entry)
        if size > self.capacity_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= _nbytes(old)
        self._entries[key] = entry
        self.bytes += size
        while self.bytes > self.capacity_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= _nbytes(evicted)


def _nbytes(entry: CachedImage) -> int:
    return entry.tensor.numel() * entry.tensor.element_size()


@dataclass(eq=False)
class Pending:
    """One image on its way through preprocess and the tower; shared by every request that asked
    for the same key meanwhile. The future resolves to the cached entry or an exception."""

    key: str
    future: asyncio.Future[CachedImage]
    # Requests waiting for the result. At 0 before the forward, the work is dropped.
    waiters: int = 0
    # Latest deadline (event-loop time) among the waiters; None once any waiter has none.
    deadline: float | None = field(default=None)
    has_deadline: bool = True
    preprocess_s: float = 0.0
    queued_at: float = 0.0  # perf_counter() when handed to the batcher

    def join(self, deadline: float | None) -> None:
        self.waiters += 1
        if deadline is None:
            self.has_deadline, self.deadline = False, None
        elif self.has_deadline:
            self.deadline = deadline if self.deadline is None else max(self.deadline, deadline)

    def abandoned(self, now: float) -> bool:
        """Nobody waits any more, or every waiter's deadline has passed."""
        if self.waiters <= 0:
            return True
        return self.has_deadline and self.deadline is not None and now >= self.deadline
