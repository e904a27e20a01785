"""Producer side: publish a tensor into the pool, get a handle any consumer can fetch."""

from __future__ import annotations

import logging
import threading
import zlib

import torch

from common.rpc import tensor_pb2
from common.transfer import backends, dtypes, fabric, metrics
from common.transfer.backends.base import ExportContext, Exporter
from common.transfer.config import MIB, TransferConfig
from common.transfer.errors import TransferError
from common.transfer.host import host_id
from common.transfer.hostmem import host_buffer
from common.transfer.pool import TensorPool
from common.transfer.servicer import TensorStoreServicer
from common.transfer.shm_segment import ShmSegment, sweep_stale

log = logging.getLogger(__name__)


# Without RDMA between the pair NIXL runs over UCX/TCP. It beats the grpc stream there only with
# NIXL's progress thread running in this producer, and only for small tensors: between two hosts
# (bench-transfer --netns) 1 MiB took 1.2 ms against grpc's 2.1 ms, 16 MiB 12.8 ms against
# 9.6-11 ms. Without the thread a NIXL fetch over TCP takes >= 60 ms.
NIXL_TCP_MAX_BYTES = 4 * MIB


def enabled_backends(config: TransferConfig, store_address: str | None) -> list[str]:
    """The locations this producer can hand out, in `auto`'s order of preference.

    `auto` on a host pool: shm for a consumer on this host; for other hosts nixl when this
    host's UCX can use RDMA (`fabric.py`) or NIXL's progress thread runs (small tensors, see
    NIXL_TCP_MAX_BYTES), else the grpc stream. A CUDA pool can only go through NIXL.
    """
    if config.backend != "auto":
        return [config.backend]
    if config.device != "cpu":
        if not backends.nixl_available():
            raise ValueError("backend 'auto' on a CUDA pool needs NIXL installed")
        return ["nixl"]
    names = ["shm"]
    useful = fabric.local_rdma(config.ucx_tls) or config.nixl_progress_thread
    if backends.nixl_available() and (useful or not store_address):
        names.append("nixl")
    if store_address:
        names.append("grpc")
    return names


class Producer:
    """Owns one pool; thread-safe. Host `servicer()` on a gRPC server at `store_address` to serve
    the grpc backend and ReleaseTensor (required for backend 'grpc', optional otherwise)."""

    def __init__(self, config: TransferConfig, store_address: str | None = None) -> None:
        self.config = config
        names = enabled_backends(config, store_address)
        self._rdma = fabric.local_rdma(config.ucx_tls)
        self.segment: ShmSegment | None = None
        if "shm" in names:
            sweep_stale(config.shm_prefix)  # segments of producers that died without cleanup
            self.segment = ShmSegment.create(config.shm_prefix, config.pool_bytes)
            assert self.segment.tensor is not None
            memory = self.segment.tensor
        else:
            memory = (
                host_buffer(config.pool_bytes)
                if config.device == "cpu"
                else torch.zeros(config.pool_bytes, dtype=torch.uint8, device=config.device)
            )
        self.pool = TensorPool(memory)
        ctx = ExportContext(self.pool, config, self.segment, store_address)
        self._exporters: dict[str, Exporter] = {}
        try:
            for name in names:
                self._exporters[name] = backends.load(name).Exporter(ctx)
        except BaseException:
            self.close()
            raise
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="epd-pool-reaper", daemon=True)
        self._reaper.start()

    @property
    def backends(self) -> list[str]:
        return list(self._exporters)

    @property
    def bytes_in_use(self) -> int:
        return self.pool.bytes_in_use

    def publish(
        self,
        tensor: torch.Tensor,
        *,
        peer_host: str | None = None,
        lease_s: float | None = None,
    ) -> tensor_pb2.TensorHandle:
        """Copy `tensor` into the pool and describe where it is. Never blocks on consumers.

        `peer_host` (the consumer's `host_id()`, if known) lets `auto` choose shm for a consumer on
        this host. Raises PoolExhaustedError when the pool is full, TensorSpecError for a dtype
        that cannot be sent.
        """
        backend = self._choose(peer_host, tensor.numel() * tensor.element_size())
        lease = self.config.lease_s if lease_s is None else lease_s
        if lease <= 0:
            raise ValueError(f"lease_s must be positive, got {lease}")
        try:
            dtype = dtypes.to_proto(tensor.dtype)
            slot = self.pool.put(tensor, lease)
        except TransferError as e:
            metrics.FAILURES.labels(backend, "producer", e.reason).inc()
            raise
        handle = tensor_pb2.TensorHandle(
            id=slot.id,
            dtype=dtype,
            shape=list(tensor.shape),
            nbytes=slot.nbytes,
            expiry_unix_ms=int(slot.expiry * 1000),
        )
        if self.config.checksum:
            data = self.pool.memory[slot.offset : slot.offset + slot.nbytes]
            handle.crc32 = zlib.crc32(data.cpu().numpy().data)
        self._exporters[backend].locate(slot, handle)
        metrics.TRANSFERS.labels(backend, "producer").inc()
        metrics.TRANSFER_BYTES.labels(backend, "producer").inc(slot.nbytes)
        return handle

    def release(self, tensor_id: str) -> bool:
        """Free a published tensor now; False if unknown or already freed (never an error)."""
        return self.pool.release(tensor_id)

    def servicer(self) -> TensorStoreServicer:
        return TensorStoreServicer(self.pool, self.config.chunk_bytes)

    def close(self) -> None:
        """Stop the reaper, drop every tensor, unregister and unlink the pool. Idempotent."""
        if hasattr(self, "_stop"):
            self._stop.set()
            self._reaper.join()
        for exporter in self._exporters.values():
            exporter.close()
        self._exporters.clear()
        self.pool.close()
        if self.segment is not None:
            self.segment.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _choose(self, peer_host: str | None, nbytes: int) -> str:
        """`auto`: shm for a consumer on this host. For one on another host NIXL when both ends
        have RDMA (a consumer that did not say where it is gets it when this end has RDMA), or
        when NIXL's progress thread runs and the tensor is small (NIXL_TCP_MAX_BYTES); otherwise
        the grpc stream. A fixed backend is the only one enabled."""
        names = self.backends
        if len(names) == 1:
            return names[0]
        if "shm" in names and peer_host == host_id():
            return "shm"
        names = [n for n in names if n != "shm"]
        if "nixl" in names and "grpc" in names:
            rdma_pair = self._rdma and (peer_host is None or fabric.peer_has_rdma(peer_host))
            small = self.config.nixl_progress_thread and nbytes <= NIXL_TCP_MAX_BYTES
            if not (rdma_pair or small):
                names.remove("nixl")
        return names[0] if names else "shm"

    def _reap_loop(self) -> None:
        while not self._stop.wait(self.config.reap_interval_s):
            try:
                self.pool.reap()
                for exporter in self._exporters.values():
                    exporter.poll()
            except Exception:  # keep reclaiming: one bad tick must not leak the pool
                log.exception("tensor pool reaper tick failed")
