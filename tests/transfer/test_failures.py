"""Producers that die or freeze: consumers get a clear error in bounded time, never a hang."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from common.transfer import (
    Consumer,
    ProducerLostError,
    TransferError,
    TransferTimeoutError,
)
from common.transfer.backends.shm import PRUNE_INTERVAL_S
from common.transfer.config import MIB
from common.transfer.loopback import LoopbackProducer, make_tensor
from common.transfer.shm_segment import sweep_stale

Spawn = Callable[..., LoopbackProducer]
SHAPE = (32 * MIB,)


class _Fetch(threading.Thread):
    """A fetch running in the background; `error` and `done_at` once it ends."""

    def __init__(self, consumer: Consumer, handle: object, deadline_s: float) -> None:
        super().__init__(daemon=True)
        self.consumer, self.handle = consumer, handle
        self.deadline = time.monotonic() + deadline_s
        self.error: BaseException | None = None
        self.done_at = 0.0

    def run(self) -> None:
        try:
            self.consumer.fetch(self.handle, deadline=self.deadline)  # type: ignore[arg-type]
        except BaseException as e:
            self.error = e
        self.done_at = time.monotonic()


@pytest.mark.parametrize("backend", ["nixl", "grpc"])
def test_producer_killed_mid_transfer(spawn: Spawn, backend: str) -> None:
    producer = spawn(backend, pool_mib=40)
    handle = producer.publish(torch.uint8, SHAPE)
    # A fresh consumer must first connect; a frozen producer holds the transfer in flight.
    with Consumer() as consumer:
        producer.signal(signal.SIGSTOP)
        fetch = _Fetch(consumer, handle, deadline_s=20.0)
        fetch.start()
        time.sleep(0.5)
        assert fetch.is_alive(), f"fetch ended before the kill: {fetch.error!r}"
        producer.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        fetch.join(timeout=5)
        assert isinstance(fetch.error, ProducerLostError), repr(fetch.error)
        assert fetch.done_at - killed_at < 1.0


def test_shm_producer_killed(spawn: Spawn) -> None:
    producer = spawn("shm", pool_mib=40)
    handle = producer.publish(torch.uint8, SHAPE)
    with Consumer() as consumer:
        consumer.fetch(producer.publish(torch.float32, (2, 2)))  # segment mapped and cached
        producer.signal(signal.SIGKILL)
        producer.proc.wait()
        start = time.monotonic()
        with pytest.raises(ProducerLostError, match="died"):
            consumer.fetch(handle)
        assert time.monotonic() - start < 1.0
    # The dead producer could not unlink its segment; the next producer's sweep does.
    assert sweep_stale(handle.shm.segment) == [handle.shm.segment]


def _mapped(segment: str) -> bool:
    return any(segment in line for line in Path("/proc/self/maps").read_text().splitlines())


def test_idle_consumer_unmaps_a_dead_producers_segment(spawn: Spawn) -> None:
    # Without another fetch: a restarted producer sharing the tmpfs needs that memory back.
    producer = spawn("shm", pool_mib=40)
    handle = producer.publish(torch.float32, (2, 2))
    with Consumer() as consumer:
        consumer.fetch(handle)
        segment = handle.shm.segment
        assert _mapped(segment)
        producer.signal(signal.SIGKILL)
        producer.proc.wait()
        end = time.monotonic() + 3 * PRUNE_INTERVAL_S + 2
        while _mapped(segment) and time.monotonic() < end:
            time.sleep(0.05)
        assert not _mapped(segment), "the consumer still maps the dead producer's segment"
    assert sweep_stale(segment) == [segment]


@pytest.mark.parametrize("backend", ["nixl", "grpc"])
def test_producer_frozen_ends_at_deadline(spawn: Spawn, backend: str) -> None:
    producer = spawn(backend, pool_mib=40)
    handle = producer.publish(torch.uint8, SHAPE, seed=5)
    out = torch.zeros(SHAPE, dtype=torch.uint8)
    with Consumer() as consumer:
        producer.signal(signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(TransferTimeoutError):
            consumer.fetch(handle, out=out, deadline=start + 1.0)
        assert 1.0 <= time.monotonic() - start < 2.0
        # The aborted transfer left both sides usable: once thawed, the same handle arrives.
        producer.signal(signal.SIGCONT)
        consumer.fetch(handle, out=out, deadline=time.monotonic() + 10)
        assert torch.equal(out, make_tensor(torch.uint8, SHAPE, seed=5))


def test_shm_frozen_producer_does_not_block(spawn: Spawn) -> None:
    # Shared-memory reads are one-sided: the data is already in the segment and the slot header
    # proves it is still ours, so a frozen producer cannot stall (or corrupt) the fetch.
    producer = spawn("shm", pool_mib=40)
    handle = producer.publish(torch.uint8, SHAPE, seed=6)
    with Consumer() as consumer:
        producer.signal(signal.SIGSTOP)
        start = time.monotonic()
        got = consumer.fetch(handle, deadline=start + 1.0)
        assert time.monotonic() - start < 1.0
        assert torch.equal(got, make_tensor(torch.uint8, SHAPE, seed=6))
        producer.signal(signal.SIGCONT)


def test_deadline_already_passed(spawn: Spawn) -> None:
    producer = spawn("grpc", pool_mib=4)
    with Consumer() as consumer, pytest.raises(TransferError):
        consumer.fetch(producer.publish(torch.float32, (2,)), deadline=time.monotonic() - 1)
