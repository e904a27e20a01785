"""Pools of gRPC backends (encoders, language replicas) with health checks and DNS discovery.

A pool is built from `host:port` entries and/or `dns:///name:port` entries. DNS names are
re-resolved every `refresh_s`, so Kubernetes headless services and compose replicas are picked up
as they come and go. Every backend is health-checked with `grpc.health.v1` on the same period;
unhealthy ones are skipped by `choose`/`rank` until a check passes again. A failed call can also
mark a backend down at once (`mark_down`).

Choice policies:
- `rank(key)`: rendezvous (highest-random-weight) hashing of `key` over healthy backends — the
  same image lands on the same encoder while the set is stable (cache affinity), and removing a
  backend only moves its own keys; callers retry down the ranking.
- `least_loaded()`: fewest requests outstanding (ties: random).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import socket
from collections.abc import Iterable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Counter

from common.contract import ReplicaInfo
from common.tls import ClientTLS, aio_channel

log = logging.getLogger(__name__)

CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]


# Seconds the calls in flight on a backend that DNS no longer lists get before its channel closes.
REMOVED_GRACE_S = 30.0


@dataclass(eq=False)
class Backend:
    address: str
    channel: grpc.aio.Channel
    healthy: bool = False
    outstanding: int = 0
    failures: int = 0
    info: ReplicaInfo | None = None  # a language replica's GetInfo, cached until marked down


class BackendPool:
    def __init__(
        self,
        name: str,
        targets: Iterable[str],
        refresh_s: float = 2.0,
        check_timeout_s: float = 1.0,
        tls: ClientTLS | None = None,
        marked_down: Counter | None = None,
    ) -> None:
        """`marked_down`: a counter labelled by pool, counted by `mark_down`."""
        self.name = name
        self.marked_down = marked_down
        self.tls = tls
        self.targets = [t.strip() for t in targets if t.strip()]
        if not self.targets:
            raise ValueError(f"no {name} addresses given")
        self.refresh_s, self.check_timeout_s = refresh_s, check_timeout_s
        self.backends: dict[str, Backend] = {}
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._closing: dict[asyncio.Task[None], grpc.aio.Channel] = {}  # removed backends

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name=f"epd-{self.name}-pool")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for b in self.backends.values():
            await b.channel.close()
        self.backends.clear()
        for closing, channel in list(self._closing.items()):  # no grace left at shutdown
            await channel.close()
            await closing

    @property
    def healthy(self) -> list[Backend]:
        return [b for b in self.backends.values() if b.healthy]

    def rank(self, key: str) -> list[Backend]:
        """Healthy backends, best first for `key` (rendezvous hashing)."""
        return sorted(self.healthy, key=lambda b: rendezvous_weight(key, b.address), reverse=True)

    def least_loaded(self, exclude: Iterable[Backend] = ()) -> Backend | None:
        skip = set(exclude)
        candidates = [b for b in self.healthy if b not in skip]
        if not candidates:
            return None
        low = min(b.outstanding for b in candidates)
        return random.choice([b for b in candidates if b.outstanding == low])

    def mark_down(self, backend: Backend, reason: str) -> None:
        if backend.healthy:
            log.warning("%s %s marked down: %s", self.name, backend.address, reason)
            if self.marked_down is not None:
                self.marked_down.labels(self.name).inc()
        backend.healthy = False
        backend.info = None  # a replica that comes back may serve differently
        backend.failures += 1

    async def wait_healthy(self, timeout: float) -> bool:
        """Wait until at least one backend is healthy (start-up)."""
        end = asyncio.get_running_loop().time() + timeout
        while not self.healthy:
            remaining = end - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, self.refresh_s))
            except TimeoutError:
                await self.refresh()
        return True

    async def refresh(self) -> None:
        addresses = await asyncio.to_thread(resolve_all, self.targets)
        for addr in addresses - self.backends.keys():
            channel = aio_channel(addr, self.tls, CHANNEL_OPTIONS)
            self.backends[addr] = Backend(addr, channel)
            log.info("%s backend added: %s", self.name, addr)
        for addr in self.backends.keys() - addresses:
            b = self.backends.pop(addr)
            # Not closed at once: that cancels the calls in flight on it, and the cancellation
            # reaches the HTTP handler, which then drops its client without a response (seen
            # when DNS stopped listing a SIGKILLed compose encoder). They finish or fail first.
            closing = asyncio.create_task(b.channel.close(grace=REMOVED_GRACE_S))
            self._closing[closing] = b.channel
            closing.add_done_callback(lambda task: self._closing.pop(task, None))
            log.info("%s backend removed: %s", self.name, addr)
        await asyncio.gather(*(self._check(b) for b in list(self.backends.values())))
        self._changed.set()

    async def _check(self, b: Backend) -> None:
        try:
            stub = health_pb2_grpc.HealthStub(b.channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=self.check_timeout_s)
            ok = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            ok = False
        if ok != b.healthy:
            log.info("%s %s is now %s", self.name, b.address, "healthy" if ok else "unhealthy")
        b.healthy = ok

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:  # discovery must never die
                log.exception("%s pool refresh failed", self.name)


def rendezvous_weight(key: str, address: str) -> bytes:
    """The weight of `address` for `key`: the highest weight wins the key."""
    return hashlib.blake2b(f"{key}|{address}".encode(), digest_size=8).digest()


def resolve_all(targets: list[str]) -> set[str]:
    out: set[str] = set()
    for t in targets:
        out |= resolve(t)
    return out


def resolve(target: str) -> set[str]:
    """`host:port` -> itself; `dns:///name:port` -> one `ip:port` per A/AAAA record."""
    if not target.startswith("dns:"):
        return {target}
    hostport = target.removeprefix("dns:").lstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bad address {target!r}: expected dns:///name:port")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror:
        return set()  # not resolvable yet (replicas starting); the next refresh retries
    return {_join(str(info[4][0]), int(port)) for info in infos}


def _join(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
