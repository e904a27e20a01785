"""Real producer processes on loopback, one per backend: data, lifecycle and error paths."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

import pytest
import torch
from prometheus_client import REGISTRY

from common.transfer import (
    ChecksumMismatchError,
    Consumer,
    PoolExhaustedError,
    TensorExpiredError,
    TensorNotFoundError,
    TensorSpecError,
    WrongHostError,
)
from common.transfer.config import MIB
from common.transfer.loopback import LoopbackProducer, make_tensor

CASES = [
    (torch.float32, (3, 5)),
    (torch.bfloat16, (64, 4 * 96)),  # [n_tokens, (1 + D) * H] with D = 3
    (torch.float16, ()),
    (torch.int64, (7,)),
    (torch.int8, (2, 3, 4)),
    (torch.bool, (5,)),
    (torch.float32, (0, 8)),
    (torch.bfloat16, (1024, 1024)),  # 2 MiB: several gRPC chunks
]


def _wait_idle(producer: LoopbackProducer, timeout: float = 2.0) -> dict[str, int]:
    """Stats once the producer holds nothing (the reaper frees acknowledged slots)."""
    end = time.monotonic() + timeout
    while (stats := producer.stats())["bytes_in_use"] and time.monotonic() < end:
        time.sleep(0.02)
    return stats


@pytest.mark.parametrize(("dtype", "shape"), CASES)
def test_round_trip(
    producer: LoopbackProducer, consumer: Consumer, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    handle = producer.publish(dtype, shape, seed=7)
    assert handle.WhichOneof("location") == producer.backends[0]
    got = consumer.fetch(handle)
    assert got.dtype == dtype and tuple(got.shape) == shape
    assert torch.equal(got, make_tensor(dtype, shape, seed=7))


def test_round_trip_into_out_and_metrics(producer: LoopbackProducer, consumer: Consumer) -> None:
    backend = producer.backends[0]
    labels = {"backend": backend, "role": "consumer"}
    before = REGISTRY.get_sample_value("epd_transfer_tensors_total", labels) or 0.0
    out = torch.full((256, 384), 3.0, dtype=torch.bfloat16)
    for seed in (1, 2):  # the second reuses `out` (and, for NIXL, its registration)
        got = consumer.fetch(producer.publish(torch.bfloat16, (256, 384), seed=seed), out=out)
        assert got is out
        assert torch.equal(out, make_tensor(torch.bfloat16, (256, 384), seed=seed))
    assert REGISTRY.get_sample_value("epd_transfer_tensors_total", labels) == before + 2
    assert _wait_idle(producer) == {"bytes_in_use": 0, "tensors": 0}


def test_fetch_twice_fails(producer: LoopbackProducer, consumer: Consumer) -> None:
    handle = producer.publish(torch.float32, (4, 4))
    consumer.fetch(handle)
    with pytest.raises(TensorNotFoundError, match="already|unknown"):
        consumer.fetch(handle)


def test_fetch_after_release_fails(producer: LoopbackProducer, consumer: Consumer) -> None:
    handle = producer.publish(torch.float32, (4, 4))
    assert producer.release(handle.id) is True
    assert producer.release(handle.id) is False  # releasing twice is harmless
    with pytest.raises(TensorNotFoundError, match="unknown or already released"):
        consumer.fetch(handle)


def test_unknown_id(producer: LoopbackProducer, consumer: Consumer) -> None:
    handle = producer.publish(torch.float32, (4, 4))
    forged = type(handle).FromString(handle.SerializeToString())
    forged.id = secrets.token_hex(16)
    with pytest.raises(TensorNotFoundError):
        consumer.fetch(forged)
    assert producer.release(handle.id)


def test_checksum_mismatch_then_retry(producer: LoopbackProducer, consumer: Consumer) -> None:
    handle = producer.publish(torch.float32, (16, 16), seed=3)
    assert handle.HasField("crc32")
    bad = type(handle).FromString(handle.SerializeToString())
    bad.crc32 ^= 1
    with pytest.raises(ChecksumMismatchError):
        consumer.fetch(bad)
    # A failed checksum is not acknowledged: the handle can still be fetched within its lease.
    assert torch.equal(consumer.fetch(handle), make_tensor(torch.float32, (16, 16), seed=3))


def test_wrong_out_and_malformed_handle(producer: LoopbackProducer, consumer: Consumer) -> None:
    handle = producer.publish(torch.float32, (4, 6))
    with pytest.raises(TensorSpecError, match="out buffer"):
        consumer.fetch(handle, out=torch.empty(4, 6, dtype=torch.float16))
    with pytest.raises(TensorSpecError, match="out buffer"):
        consumer.fetch(handle, out=torch.empty(6, 4))
    lying = type(handle).FromString(handle.SerializeToString())
    lying.shape[:] = [4, 7]
    with pytest.raises(TensorSpecError, match="nbytes"):
        consumer.fetch(lying)
    assert producer.release(handle.id)


def test_lease_expiry_frees_memory(producer: LoopbackProducer, consumer: Consumer) -> None:
    handle = producer.publish(torch.uint8, (MIB,), lease_s=0.2)
    assert producer.stats()["bytes_in_use"] > 0
    time.sleep(0.3)
    with pytest.raises(TensorExpiredError, match="expired"):
        consumer.fetch(handle)
    assert _wait_idle(producer) == {"bytes_in_use": 0, "tensors": 0}


def test_pool_exhaustion_fails_at_once(producer: LoopbackProducer, consumer: Consumer) -> None:
    first = producer.publish(torch.uint8, (40 * MIB,))
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=PoolExhaustedError.__name__):
        producer.publish(torch.uint8, (40 * MIB,))
    assert time.monotonic() - start < 1.0  # never waits for consumers
    consumer.fetch(first)
    assert _wait_idle(producer)["bytes_in_use"] == 0
    consumer.fetch(producer.publish(torch.uint8, (40 * MIB,)))  # room again


def test_shm_handle_from_another_host(
    spawn: Callable[..., LoopbackProducer], consumer: Consumer
) -> None:
    producer = spawn("shm", pool_mib=4)
    handle = producer.publish(torch.float32, (2, 2))
    moved = type(handle).FromString(handle.SerializeToString())
    moved.shm.host_id = "other-node/0000"
    with pytest.raises(WrongHostError, match="other-node"):
        consumer.fetch(moved)
    assert torch.equal(consumer.fetch(handle), make_tensor(torch.float32, (2, 2), seed=0))
