"""The cores of one host shared by its torch roles (`epd up`), forward by forward.

Two processes that each run an OpenMP team of one thread per core oversubscribe the cores as
soon as both compute: every parallel region waits for its slowest thread, and with more threads
than cores that thread is often descheduled. On 2 cores an 8-token decoder forward took 25 ms
alone and 103-105 ms beside a vision tower forward (2 + 2 threads; 25 ms with 1 + 1), while one
thread per role leaves a core idle whenever only one role works (the tower took 32 ms with 2
threads, 45-47 ms with 1).

So each role claims its threads when a forward starts: the cores that no other role holds at
that moment (at least one), published in a tiny shared-memory ledger, one slot per role, and
gives them back when the forward ends. A role alone gets every core; two busy roles split them.
Between two layers (`rebalance`, which the models call) a running forward claims again, so a
role that started alone gives a core up as soon as another starts, and takes it back when that
one ends: a long prefill step otherwise kept both cores for its whole length beside the
tower's thread (three threads on two cores). With 2 + 1 threads image prompts' prefill steps
ran 0.4-0.8 ms per token beside the tower against 0.27-0.29 alone; checking per layer took
`epd up` from 239-253 to 256-291 tok/s (images, ~216-token prompts, concurrency 32, three
interleaved rounds on 2 cores). Reads and writes are plain loads and stores: two roles that
start at the same instant may both take every core for one layer, which costs that layer and
nothing else.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

_SLOT = struct.Struct("<i")

# `running`: the share whose forward runs now on this thread (a role's torch thread), for
# `rebalance`; unset outside forwards and in processes that share no cores.
_local = threading.local()


def rebalance() -> None:
    """Between two layers of a forward: claim the cores again (`CoreShare.claim`); a no-op
    outside a shared forward, so models call it unconditionally."""
    share = getattr(_local, "running", None)
    if share is not None:
        share.claim()


def create_ledger(path: str | Path, roles: int) -> None:
    """A zeroed ledger of `roles` slots (`epd up` makes it before starting the roles)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, _SLOT.size * roles)
    finally:
        os.close(fd)


class CoreShare:
    """One role's view of the ledger: `forward()` around every forward it runs."""

    def __init__(
        self, path: str | Path, slot: int, cores: int, set_threads: Callable[[int], None]
    ) -> None:
        """`set_threads(n)` sizes the caller's compute (torch.set_num_threads on its torch
        thread); it is called only when the count changes."""
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        self.roles = len(self._map) // _SLOT.size
        if not 0 <= slot < self.roles or cores <= 0:
            raise ValueError(f"core ledger {path}: slot {slot} of {self.roles}, {cores} cores")
        self.slot, self.cores, self._set_threads = slot, cores, set_threads
        self._threads = 0

    @classmethod
    def from_spec(cls, spec: str, set_threads: Callable[[int], None]) -> CoreShare:
        """`PATH,SLOT,CORES` as `epd up` passes it in `--share-cores`."""
        try:
            path, slot, cores = spec.rsplit(",", 2)
            return cls(path, int(slot), int(cores), set_threads)
        except (ValueError, OSError) as e:
            raise ValueError(f"--share-cores {spec!r}: expected PATH,SLOT,CORES ({e})") from e

    def held_by_others(self) -> int:
        return sum(
            _SLOT.unpack_from(self._map, i * _SLOT.size)[0]
            for i in range(self.roles)
            if i != self.slot
        )

    @contextlib.contextmanager
    def forward(self) -> Iterator[int]:
        """Claim the free cores (at least one) for one forward; yields the thread count."""
        n = self.claim()
        _local.running = self
        try:
            yield n
        finally:
            _local.running = None
            _SLOT.pack_into(self._map, self.slot * _SLOT.size, 0)

    def claim(self) -> int:
        """Take what the others leave (at least one) and size the caller's threads to it;
        returns the count. `forward` claims on entry, `rebalance` again between layers, so that
        the rest of a forward neither oversubscribes the cores nor leaves one idle."""
        n = max(1, self.cores - self.held_by_others())
        _SLOT.pack_into(self._map, self.slot * _SLOT.size, n)
        if n != self._threads:
            self._set_threads(n)
            self._threads = n
        return n

    def close(self) -> None:
        self._map.close()
