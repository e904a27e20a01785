"""`auto` picks the backend that fits the pair: shm on one host; NIXL to another host only when
both ends have RDMA (over UCX/TCP it is the slowest backend); otherwise the grpc stream."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SHM_PREFIX

from common.transfer import Producer, TransferConfig, fabric, host_id
from common.transfer.config import MIB
from common.transfer.producer import NIXL_TCP_MAX_BYTES


def auto_producer(progress_thread: bool = False) -> Producer:
    config = TransferConfig(
        backend="auto",
        pool_bytes=8 * MIB,
        shm_prefix=SHM_PREFIX,
        nixl_progress_thread=progress_thread,
    )
    # The grpc exporter only writes this address into handles; nothing dials it here.
    return Producer(config, store_address="127.0.0.1:9")


def chosen(producer: Producer, peer: str | None, nbytes: int = 64) -> str:
    handle = producer.publish(torch.zeros(nbytes, dtype=torch.uint8), peer_host=peer)
    producer.release(handle.id)
    return str(handle.WhichOneof("location"))


def test_without_rdma_other_hosts_get_grpc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fabric, "has_rdma", lambda: False)
    with auto_producer() as producer:
        assert producer.backends == ["shm", "grpc"]  # no NIXL agent made at all
        assert chosen(producer, host_id()) == "shm"
        for peer in ("other-host/boot", "other-host/boot;rdma", None):
            assert chosen(producer, peer) == "grpc", peer


def test_with_rdma_at_both_ends_other_hosts_get_nixl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fabric, "has_rdma", lambda: True)
    with auto_producer() as producer:
        assert producer.backends == ["shm", "nixl", "grpc"]
        assert chosen(producer, host_id()) == "shm"
        assert chosen(producer, "other-host/boot;rdma") == "nixl"
        assert chosen(producer, "other-host/boot") == "grpc"  # the consumer has no RDMA
        assert chosen(producer, None) == "nixl"  # unknown peer: this end's fabric decides


def test_progress_thread_sends_small_tensors_over_tcp_through_nixl(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Measured between two hosts without RDMA: NIXL with its progress thread wins at 1 MiB,
    # the grpc stream from ~8-16 MiB.
    monkeypatch.setattr(fabric, "has_rdma", lambda: False)
    with auto_producer(progress_thread=True) as producer:
        assert producer.backends == ["shm", "nixl", "grpc"]
        assert chosen(producer, host_id()) == "shm"
        assert chosen(producer, "other-host/boot", nbytes=NIXL_TCP_MAX_BYTES) == "nixl"
        assert chosen(producer, "other-host/boot", nbytes=NIXL_TCP_MAX_BYTES + 1) == "grpc"


def test_ucx_tls_without_rdma_transports_means_no_rdma(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fabric, "has_rdma", lambda: True)
    monkeypatch.delenv("UCX_TLS", raising=False)
    assert fabric.local_rdma(None)
    assert not fabric.local_rdma("tcp,sm,self")
    monkeypatch.setenv("UCX_TLS", "tcp")
    assert not fabric.local_rdma(None)
    assert fabric.local_rdma("rc,sm")  # the flag wins over the environment


@pytest.mark.parametrize(
    ("tls", "allowed"),
    [(None, True), ("", True), ("all", True), ("tcp", False), ("tcp,sm,self", False),
     ("rc,sm,self", True), ("ud_mlx5", True), ("srd", True), ("^tcp", True), ("^ib", False),
     ("^rc,ud,dc,srd", False), ("^rc,ud", True), ("^rc_verbs,rc_mlx5,rc,ud,dc_mlx5,dc,srd", False),
     ("cuda_copy,cuda_ipc,tcp", False)],
)  # fmt: skip
def test_ucx_tls_parsing(tls: str | None, allowed: bool) -> None:
    assert fabric.tls_allows_rdma(tls) is allowed


def test_rdma_ports_from_sysfs(tmp_path: Path) -> None:
    for dev, port, state in [("mlx5_0", 1, "4: ACTIVE"), ("mlx5_1", 1, "1: DOWN"),
                             ("efa_0", 1, "4: ACTIVE")]:  # fmt: skip
        d = tmp_path / dev / "ports" / str(port)
        d.mkdir(parents=True)
        (d / "state").write_text(state + "\n")
    assert fabric.active_rdma_ports(tmp_path) == ["efa_0:1", "mlx5_0:1"]
    assert fabric.active_rdma_ports(tmp_path / "missing") == []


def test_peer_identity_carries_the_fabric() -> None:
    assert fabric.peer_has_rdma("node-a/1234;rdma")
    assert not fabric.peer_has_rdma("node-a/1234")
    assert not fabric.peer_has_rdma("rdma-node/1234")  # a hostname is not a tag
    assert not fabric.peer_has_rdma(None)


def test_ucx_settings_must_be_comma_lists() -> None:
    with pytest.raises(ValueError, match="ucx_tls"):
        TransferConfig(ucx_tls="rc, tcp")
    with pytest.raises(ValueError, match="ucx_net_devices"):
        TransferConfig(ucx_net_devices="")
