"""In-process units: the allocator, the pool's leases and the slot header protocol."""

from __future__ import annotations

import time

import pytest
import torch

from common.transfer import PoolExhaustedError, TensorExpiredError, TensorNotFoundError, header
from common.transfer.allocator import Allocator
from common.transfer.pool import TensorPool


def test_allocator_first_fit_and_coalescing() -> None:
    a = Allocator(10 * 4096)
    x, y, z = a.allocate(1), a.allocate(4097), a.allocate(4096)
    assert (x, y, z) == (0, 4096, 3 * 4096)
    assert a.bytes_in_use == 4 * 4096
    a.free(y)
    assert a.allocate(3 * 4096) == 4 * 4096  # the 2-page hole is too small: first fit skips it
    a.free(x)
    a.free(z)
    assert a.largest_free() == 4 * 4096  # x, the hole and z coalesced
    assert a.allocate(8 * 4096) is None
    assert a.allocate(4 * 4096) == 0


def _pool(nbytes: int = 1 << 20) -> TensorPool:
    return TensorPool(torch.zeros(nbytes, dtype=torch.uint8))


def test_pool_put_release_and_usage() -> None:
    pool = _pool()
    t = torch.arange(100, dtype=torch.float32)
    slot = pool.put(t, lease_s=60)
    data = pool.memory[slot.offset : slot.offset + slot.nbytes].view(torch.float32)
    assert torch.equal(data, t)
    raw = pool.memory[slot.header_offset : slot.header_offset + header.HEADER_USED]
    assert header.decode(raw.numpy().tobytes()) == (slot.id, header.STATE_LIVE)
    assert pool.bytes_in_use == 4096
    assert pool.release(slot.id) and not pool.release(slot.id)
    assert pool.bytes_in_use == 0
    assert header.decode(raw.numpy().tobytes())[1] == 0  # header zeroed before reuse


def test_pool_full_fails_immediately() -> None:
    pool = _pool(64 * 1024)
    pool.put(torch.zeros(40 * 1024, dtype=torch.uint8), lease_s=60)
    with pytest.raises(PoolExhaustedError, match="pool full"):
        pool.put(torch.zeros(40 * 1024, dtype=torch.uint8), lease_s=60)


def test_pool_reaps_expired_and_acknowledged() -> None:
    pool = _pool()
    short = pool.put(torch.zeros(10), lease_s=0.05)
    acked = pool.put(torch.zeros(10), lease_s=60)
    kept = pool.put(torch.zeros(10), lease_s=60)
    ack = torch.frombuffer(
        bytearray(header.encode(acked.id, header.STATE_ACKED)), dtype=torch.uint8
    )
    pool.memory[acked.header_offset : acked.header_offset + header.HEADER_USED] = ack
    time.sleep(0.06)
    assert pool.reap() == 2
    assert len(pool) == 1 and pool.pin(kept.id) is kept
    with pytest.raises(TensorNotFoundError):
        pool.pin(short.id)


def test_pinned_slot_outlives_release_until_unpinned() -> None:
    pool = _pool()
    slot = pool.put(torch.zeros(10), lease_s=60)
    pool.pin(slot.id)
    assert pool.release(slot.id)
    assert pool.bytes_in_use == 4096  # a stream is still reading it
    pool.unpin(slot)
    assert pool.bytes_in_use == 0


def test_pin_expired() -> None:
    pool = _pool()
    slot = pool.put(torch.zeros(10), lease_s=0.01)
    time.sleep(0.02)
    with pytest.raises(TensorExpiredError):
        pool.pin(slot.id)
