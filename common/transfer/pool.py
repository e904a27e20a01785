"""The producer's tensor pool: fixed memory, a first-fit allocator and a lease per tensor.

Memory is reclaimed on whichever comes first: the consumer's acknowledgement (a header written by
a one-sided reader, or a ReleaseTensor call), an explicit `release`, or lease expiry. A full pool
fails `put` at once with PoolExhaustedError; it never waits for consumers.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass

import torch

from common.transfer import header, metrics
from common.transfer.allocator import Allocator
from common.transfer.errors import PoolExhaustedError, TensorExpiredError, TensorNotFoundError
from common.transfer.memcopy import copy_bytes


@dataclass
class Slot:
    """One published tensor's place in the pool. Mutable fields are guarded by the pool lock."""

    id: str
    offset: int  # first data byte, page-aligned
    nbytes: int
    header_offset: int
    expiry: float  # time.time() seconds
    pins: int = 0  # active gRPC streams reading it; freeing waits for them
    dead: bool = False  # released/expired while pinned: freed at the last unpin


class TensorPool:
    """Thread-safe. `memory` is a flat uint8 tensor the pool owns for its whole life."""

    def __init__(self, memory: torch.Tensor) -> None:
        if memory.dtype != torch.uint8 or memory.dim() != 1 or not memory.is_contiguous():
            raise ValueError("pool memory must be a flat contiguous uint8 tensor")
        self.memory = memory
        self.alloc = Allocator(memory.numel())
        self._slots: dict[str, Slot] = {}
        self._lock = threading.Lock()
        self._zero_header = torch.zeros(header.HEADER_USED, dtype=torch.uint8)
        metrics.POOL_BYTES_CAPACITY.inc(self.alloc.capacity)

    @property
    def bytes_in_use(self) -> int:
        return self.alloc.bytes_in_use

    def __len__(self) -> int:
        return len(self._slots)

    def put(self, tensor: torch.Tensor, lease_s: float) -> Slot:
        """Copy `tensor` into a fresh slot and mark it live. Raises PoolExhaustedError if full."""
        src = tensor.detach().contiguous().reshape(-1).view(torch.uint8)  # [nbytes]
        nbytes = src.numel()
        size = header.slot_bytes(nbytes)
        with self._lock:
            offset = self.alloc.allocate(size)
        if offset is None:
            self.reap()
            with self._lock:
                offset = self.alloc.allocate(size)
        if offset is None:
            raise PoolExhaustedError(
                f"tensor pool full: need {size} bytes, {self.alloc.capacity - self.bytes_in_use} "
                f"free (largest contiguous {self.alloc.largest_free()}) of {self.alloc.capacity}, "
                f"{len(self._slots)} tensors not yet acknowledged by consumers"
            )
        metrics.POOL_BYTES_IN_USE.inc(self.alloc.round_up(size))
        slot = Slot(
            id=secrets.token_hex(16),
            offset=offset,
            nbytes=nbytes,
            header_offset=header.header_offset(offset, nbytes),
            expiry=time.time() + lease_s,
        )
        copy_bytes(self.memory[offset : offset + nbytes], src)
        # Data before header: a reader that sees our id in the header sees the whole tensor.
        self._write_header(slot.header_offset, header.encode(slot.id, header.STATE_LIVE))
        with self._lock:
            self._slots[slot.id] = slot
        return slot

    def release(self, tensor_id: str) -> bool:
        """Free a tensor now. False (and no error) if it is unknown or already freed."""
        with self._lock:
            slot = self._slots.pop(tensor_id, None)
            if slot is None:
                return False
            self._retire(slot)
            return True

    def pin(self, tensor_id: str) -> Slot:
        """Keep a slot's memory until `unpin` (for a gRPC stream reading it)."""
        with self._lock:
            slot = self._slots.get(tensor_id)
            if slot is None:
                raise TensorNotFoundError(f"tensor {tensor_id} is unknown or already released")
            if slot.expiry <= time.time():
                raise TensorExpiredError(f"tensor {tensor_id}: lease expired")
            slot.pins += 1
            return slot

    def unpin(self, slot: Slot) -> None:
        with self._lock:
            slot.pins -= 1
            if slot.dead and slot.pins == 0:
                self._free(slot)

    def reap(self) -> int:
        """Free every acknowledged or expired slot; returns how many were freed."""
        now = time.time()
        with self._lock:
            done = [s for s in self._slots.values() if s.expiry <= now or self._acked(s)]
            for slot in done:
                del self._slots[slot.id]
                self._retire(slot)
        return len(done)

    def close(self) -> None:
        with self._lock:
            metrics.POOL_BYTES_IN_USE.dec(self.alloc.bytes_in_use)
            metrics.POOL_BYTES_CAPACITY.dec(self.alloc.capacity)
            self._slots.clear()
            self.alloc = Allocator(0)
            # Drop our view so a shared-memory segment under it can be unmapped.
            self.memory = torch.empty(0, dtype=torch.uint8)

    def _retire(self, slot: Slot) -> None:
        # Caller holds the lock and has removed the slot from _slots.
        if slot.pins:
            slot.dead = True
        else:
            self._free(slot)

    def _free(self, slot: Slot) -> None:
        # Zero the header before the offset can be handed out again (see header.py).
        self._write_header(slot.header_offset, b"")
        size = self.alloc.round_up(header.slot_bytes(slot.nbytes))
        self.alloc.free(slot.offset)
        metrics.POOL_BYTES_IN_USE.dec(size)

    def _acked(self, slot: Slot) -> bool:
        raw = self.memory[slot.header_offset : slot.header_offset + header.HEADER_USED]
        tensor_id, state = header.decode(raw.cpu().numpy().tobytes())
        return tensor_id == slot.id and state == header.STATE_ACKED

    def _write_header(self, offset: int, raw: bytes) -> None:
        src = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else self._zero_header
        self.memory[offset : offset + header.HEADER_USED].copy_(src)
