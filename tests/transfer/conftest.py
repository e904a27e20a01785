"""Fixtures: loopback producer processes (always stopped) and a session-wide /dev/shm leak check."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from common.transfer import Consumer
from common.transfer.loopback import LoopbackProducer
from common.transfer.shm_segment import SHM_DIR

# Our segments are recognisable by this prefix; nothing with it may outlive the test session.
SHM_PREFIX = f"epd-test-{os.getpid()}-"
BACKENDS = ["shm", "nixl", "grpc"]

Spawn = Callable[..., LoopbackProducer]


@pytest.fixture(scope="session", autouse=True)
def no_leaked_segments() -> Iterator[None]:
    yield
    left = sorted(p.name for p in SHM_DIR.glob(f"{SHM_PREFIX}*"))
    assert not left, f"shared-memory segments left behind: {left}"


def _spawner() -> tuple[Spawn, list[LoopbackProducer]]:
    started: list[LoopbackProducer] = []

    def spawn(backend: str, **kwargs: object) -> LoopbackProducer:
        producer = LoopbackProducer(backend, shm_prefix=SHM_PREFIX, **kwargs)  # type: ignore[arg-type]
        started.append(producer)
        return producer

    return spawn, started


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start throwaway producers (for kill/stop tests); all are stopped after the test."""
    factory, started = _spawner()
    yield factory
    for producer in started:
        producer.close()


@pytest.fixture(scope="module", params=BACKENDS)
def producer(request: pytest.FixtureRequest) -> Iterator[LoopbackProducer]:
    """One long-lived producer per backend (64 MiB pool, CRC-32 on), shared by a module."""
    factory, started = _spawner()
    yield factory(request.param, pool_mib=64, checksum=True)
    for p in started:
        p.close()


@pytest.fixture(scope="module")
def consumer() -> Iterator[Consumer]:
    with Consumer() as c:
        yield c
