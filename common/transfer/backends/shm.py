"""Shared-memory backend: the pool is a /dev/shm segment; the consumer maps it and copies once.

Reads are one-sided: a frozen producer cannot stall them (its data is already in the segment and
the slot header proves it is still ours), and a dead one is detected through the segment's flock.
A consumer drops its mapping of a dead producer's segment within a second, fetching or not: until
it does, that pool stays allocated in /dev/shm, and a restarted encoder sharing the tmpfs found
no room for its own (compose: ENOSPC, crash loop).
"""

from __future__ import annotations

import threading
import time

import torch

from common.rpc import tensor_pb2
from common.transfer import header
from common.transfer.backends.base import ExportContext
from common.transfer.config import TransferConfig
from common.transfer.errors import (
    ProducerLostError,
    TensorSpecError,
    TransferTimeoutError,
    WrongHostError,
)
from common.transfer.handle import check_header
from common.transfer.host import host_id
from common.transfer.memcopy import copy_bytes
from common.transfer.pool import Slot
from common.transfer.shm_segment import ShmSegment

# How often a consumer looks for cached segments whose producer has died, in seconds.
PRUNE_INTERVAL_S = 1.0


class Exporter:
    def __init__(self, ctx: ExportContext) -> None:
        if ctx.segment is None:
            raise ValueError("the shm backend needs the pool to live in a shared-memory segment")
        self._segment = ctx.segment

    def locate(self, slot: Slot, handle: tensor_pb2.TensorHandle) -> None:
        loc = handle.shm
        loc.segment = self._segment.name
        loc.segment_bytes = self._segment.size
        loc.data_offset = slot.offset
        loc.header_offset = slot.header_offset
        loc.host_id = host_id()

    def poll(self) -> None:
        pass

    def close(self) -> None:
        pass


class Reader:
    def __init__(self, config: TransferConfig) -> None:
        self._segments: dict[str, ShmSegment] = {}  # one mapping per producer segment
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pruner = threading.Thread(target=self._prune_loop, name="epd-shm-prune", daemon=True)
        self._pruner.start()

    def read(
        self, handle: tensor_pb2.TensorHandle, out: torch.Tensor, deadline: float, reused: bool
    ) -> None:
        loc = handle.shm
        seg, memory = self._segment(loc)
        n = handle.nbytes
        if loc.data_offset + n > seg.size or loc.header_offset + header.HEADER_BYTES > seg.size:
            raise TensorSpecError(f"handle {handle.id} points outside segment {loc.segment}")
        if time.monotonic() > deadline:
            raise TransferTimeoutError(f"fetch of {handle.id}: deadline passed before the copy")
        copy_bytes(out, memory[loc.data_offset : loc.data_offset + n])
        check_header(handle, self._header(memory, loc.header_offset))

    def acknowledge(self, handle: tensor_pb2.TensorHandle, deadline: float) -> None:
        loc = handle.shm
        _, memory = self._segment(loc)
        if header.decode(self._header(memory, loc.header_offset))[0] == handle.id:
            ack = header.encode(handle.id, header.STATE_ACKED)
            view = memory[loc.header_offset : loc.header_offset + header.HEADER_USED]
            view.copy_(torch.frombuffer(bytearray(ack), dtype=torch.uint8))

    def close(self) -> None:
        self._stop.set()
        self._pruner.join()
        with self._lock:
            for seg in self._segments.values():
                seg.close()
            self._segments.clear()

    def prune(self) -> list[str]:
        """Unmap every cached segment whose producer has died; the names dropped."""
        with self._lock:
            dead = [name for name, seg in self._segments.items() if not seg.owner_alive()]
            for name in dead:
                self._segments.pop(name).close()
        return dead

    def _prune_loop(self) -> None:
        while not self._stop.wait(PRUNE_INTERVAL_S):
            self.prune()

    def _segment(self, loc: tensor_pb2.ShmLocation) -> tuple[ShmSegment, torch.Tensor]:
        """The segment and our own view of its memory: a prune may unmap the segment meanwhile,
        and the mapping then lives until that view is gone."""
        if loc.host_id != host_id():
            raise WrongHostError(
                f"shared-memory segment {loc.segment} lives on host {loc.host_id!r}, this is "
                f"{host_id()!r}: publish with backend nixl or grpc for consumers on other hosts"
            )
        with self._lock:
            seg = self._segments.get(loc.segment)
            if seg is None:
                try:
                    seg = ShmSegment.attach(loc.segment, loc.segment_bytes)
                except FileNotFoundError:
                    raise ProducerLostError(
                        f"shared-memory segment {loc.segment} does not exist: its producer has "
                        "exited, or this process does not share /dev/shm with it"
                    ) from None
                except ValueError as e:
                    raise TensorSpecError(str(e)) from None
                self._segments[loc.segment] = seg
            if not seg.owner_alive():
                # Drop our mapping so the dead producer's memory can be returned to the system.
                del self._segments[loc.segment]
                seg.close()
                raise ProducerLostError(f"producer of segment {loc.segment} has died")
            assert seg.tensor is not None
            return seg, seg.tensor

    @staticmethod
    def _header(memory: torch.Tensor, offset: int) -> bytes:
        return memory[offset : offset + header.HEADER_USED].numpy().tobytes()
