"""The two halves every transfer backend implements.

An Exporter lives in the producer and says where a pool slot can be read (it fills the handle's
location); a Reader lives in the consumer and pulls the bytes from such a location. Backends are
named after the location field they own in `TensorHandle` (nixl, shm, grpc).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from common.rpc import tensor_pb2
from common.transfer.config import TransferConfig
from common.transfer.pool import Slot, TensorPool
from common.transfer.shm_segment import ShmSegment


@dataclass(frozen=True)
class ExportContext:
    """What a producer gives its exporters: the pool and where it lives."""

    pool: TensorPool
    config: TransferConfig
    segment: ShmSegment | None  # set when the pool memory is a shared-memory segment
    store_address: str | None  # "host:port" where the producer hosts TensorStore, if it does


class Exporter(Protocol):
    def __init__(self, ctx: ExportContext) -> None: ...

    def locate(self, slot: Slot, handle: tensor_pb2.TensorHandle) -> None:
        """Fill `handle`'s location for `slot` (called once per publish)."""

    def poll(self) -> None:
        """Periodic producer-side work, called from the reaper thread every tick."""

    def close(self) -> None: ...


class Reader(Protocol):
    def __init__(self, config: TransferConfig) -> None: ...

    def read(
        self, handle: tensor_pb2.TensorHandle, out: torch.Tensor, deadline: float, reused: bool
    ) -> None:
        """Copy the handle's `nbytes` into `out` ([nbytes] uint8) before `deadline`
        (time.monotonic()), proving the producer did not reclaim them meanwhile. `reused` says the
        caller will pass this buffer again (worth caching a registration for)."""

    def acknowledge(self, handle: tensor_pb2.TensorHandle, deadline: float) -> None:
        """Tell the producer it may free the tensor."""

    def close(self) -> None: ...
