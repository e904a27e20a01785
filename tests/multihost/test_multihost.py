"""The roles on separate hosts: encoder, language and gateway each in a network namespace of its
own (own address, hostname, PIDs), joined by a bridge; real TCP between them, no RDMA. A client
host drives the gateway with the official openai client. Everything (processes, namespaces,
bridge, iptables rules) is removed after each stack. Needs root and `ip netns`.

- every transport (nixl, grpc, auto) carries image+text chats across hosts, and the language
  service fetched the tensors through the expected backend (auto: grpc, as there is no RDMA);
- with 1 % and 5 % of every host's outgoing packets dropped at random, every request succeeds.

test_kill.py kills an encoder host mid-transfer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.netns import available, loss_available
from tests.multihost.cluster import Cluster

REASON = available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"multi-host tests: {REASON}")

DEADLINE_S = 40.0  # each request's client-side deadline
# With no RDMA between the hosts, `auto` must publish through the grpc stream (fabric.py).
EXPECTED = {"nixl": "nixl", "grpc": "grpc", "auto": "grpc"}


def fetched(cluster: Cluster, backend: str) -> float:
    return sum(
        cluster.metric(lang, "epd_transfer_tensors_total", {"backend": backend, "role": "consumer"})
        for lang in cluster.languages
    )


def assert_all_ok(results: list[dict[str, object]]) -> None:
    failed = [r for r in results if not r["ok"]]
    assert not failed, failed


@pytest.fixture(scope="module", params=["nixl", "grpc", "auto"])
def cluster(request: pytest.FixtureRequest, tiny_model: Path) -> Iterator[Cluster]:
    c = Cluster(tiny_model, request.param)
    try:
        yield c
    finally:
        c.close()


def test_chat_across_hosts(cluster: Cluster) -> None:
    results = cluster.chat(6, seed=100)
    assert_all_ok(results)
    backend = EXPECTED[cluster.transport]
    assert fetched(cluster, backend) >= 6
    others = {"nixl", "grpc", "shm"} - {backend}
    assert all(fetched(cluster, b) == 0 for b in others), {b: fetched(cluster, b) for b in others}


@pytest.mark.skipif(loss_available() is not None, reason=f"packet loss: {loss_available()}")
@pytest.mark.parametrize("loss", [0.01, 0.05])
def test_packet_loss(cluster: Cluster, loss: float) -> None:
    hosts = [*cluster.encoders, *cluster.languages, "gateway", "client"]
    for host in hosts:
        cluster[host].set_loss(loss)
    try:
        results = cluster.chat(8, seed=1000 + int(loss * 1000), concurrency=2)
    finally:
        for host in hosts:
            cluster[host].set_loss(0)
    assert_all_ok(results)
    assert max(float(str(r["seconds"])) for r in results) < DEADLINE_S
