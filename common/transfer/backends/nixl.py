"""NIXL backend: the consumer pulls with a one-sided NIXL READ (UCX underneath: CMA on one host,
RDMA across hosts, cuda_ipc/GPUDirect when the pool or `out` is on a GPU).

The producer registers its whole pool once (on an RDMA NIC registration pins every page; UCX
without RDMA registered a 1 GiB pool in under 10 ms here). The consumer registers its `out` buffers
(cached when the caller reuses them), reads the data, re-reads the slot header to prove the slot
was not reclaimed meanwhile, then acknowledges by writing the header. A deadline aborts the READ
(releasing a NIXL request cancels it) before `fetch` returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import nixl_cu12 as nixl
import torch

from common.rpc import tensor_pb2
from common.transfer import header
from common.transfer.backends.base import ExportContext
from common.transfer.config import TransferConfig
from common.transfer.errors import (
    ProducerLostError,
    TensorSpecError,
    TransferError,
    TransferTimeoutError,
)
from common.transfer.handle import check_header
from common.transfer.pool import Slot

# Consumer-side buffers kept registered because the caller passes them again (bench, reuse).
_REG_CACHE = 4
# Concurrent fetches per consumer (each needs a registered header scratch slot).
_SCRATCH_SLOTS = 64

T = TypeVar("T")

# NIXL logs INFO lines to stdout, which corrupts machine-readable output (bench-transfer --json).
# An explicit NIXL_LOG_LEVEL wins; otherwise keep warnings and errors only.
if "NIXL_LOG_LEVEL" not in os.environ:
    logging.getLogger("nixl").setLevel(logging.WARNING)


def _agent(role: str, config: TransferConfig) -> Any:
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")  # UCX warns on stdout otherwise
    # UCX has no per-agent transport setting through NIXL: it reads these from the environment.
    if config.ucx_tls is not None:
        os.environ["UCX_TLS"] = config.ucx_tls
    if config.ucx_net_devices is not None:
        os.environ["UCX_NET_DEVICES"] = config.ucx_net_devices
    # Unique per process instance, so a restarted producer is never confused with its old self.
    name = f"epd-{role}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    conf = nixl.nixl_agent_config(enable_prog_thread=config.nixl_progress_thread, backends=["UCX"])
    return nixl.nixl_agent(name, conf)


def _mem_type(t: torch.Tensor) -> tuple[str, int]:
    return ("VRAM", t.get_device()) if t.is_cuda else ("DRAM", 0)


class Exporter:
    def __init__(self, ctx: ExportContext) -> None:
        self._agent = _agent("producer", ctx.config)
        memory = ctx.pool.memory
        self._reg = self._agent.register_memory(memory)
        # Fetched after registration: the metadata carries the pool's remote keys.
        self._metadata: bytes = self._agent.get_agent_metadata()
        self._mem_type, self._device = _mem_type(memory)
        self._base = memory.data_ptr()

    def locate(self, slot: Slot, handle: tensor_pb2.TensorHandle) -> None:
        loc = handle.nixl
        loc.agent_name = self._agent.name
        loc.agent_metadata = self._metadata
        loc.mem_type = self._mem_type
        loc.device_id = self._device
        loc.data_address = self._base + slot.offset
        loc.header_address = self._base + slot.header_offset

    def poll(self) -> None:
        # Progresses the agent's UCX worker (connection set-up needs it without a progress thread).
        self._agent.get_new_notifs()

    def close(self) -> None:
        self._agent.deregister_memory(self._reg)
        del self._agent


class Reader:
    """Thread-safe: NIXL calls are serialized by a lock; waits happen outside it."""

    def __init__(self, config: TransferConfig) -> None:
        self._agent = _agent("consumer", config)
        self._lock = threading.Lock()
        self._remotes: dict[str, str] = {}  # producer agent name -> NIXL remote name
        self._regs: OrderedDict[tuple[int, int, str], tuple[torch.Tensor, Any]] = OrderedDict()
        self._scratch = torch.zeros(_SCRATCH_SLOTS, header.HEADER_BYTES, dtype=torch.uint8)
        self._scratch_reg = self._agent.register_memory(self._scratch)
        self._free_scratch: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(_SCRATCH_SLOTS):
            self._free_scratch.put(i)

    def read(
        self, handle: tensor_pb2.TensorHandle, out: torch.Tensor, deadline: float, reused: bool
    ) -> None:
        loc = handle.nixl
        if loc.mem_type not in ("DRAM", "VRAM"):
            raise TensorSpecError(f"handle {handle.id}: unknown NIXL memory type {loc.mem_type!r}")
        remote = self._remote(loc)
        if handle.nbytes:
            with self._registered(out, reused) as local:
                src = [(loc.data_address, handle.nbytes, loc.device_id)]
                self._transfer("READ", local, src, loc, remote, deadline)
        with self._scratch_slot(deadline) as (i, scratch):
            src = [(loc.header_address, header.HEADER_USED, loc.device_id)]
            self._transfer("READ", scratch, src, loc, remote, deadline)
            check_header(handle, self._scratch[i, : header.HEADER_USED].numpy().tobytes())

    def acknowledge(self, handle: tensor_pb2.TensorHandle, deadline: float) -> None:
        loc = handle.nixl
        remote = self._remote(loc)
        with self._scratch_slot(deadline) as (i, scratch):
            ack = header.encode(handle.id, header.STATE_ACKED)
            self._scratch[i, : header.HEADER_USED] = torch.frombuffer(
                bytearray(ack), dtype=torch.uint8
            )
            dst = [(loc.header_address, header.HEADER_USED, loc.device_id)]
            self._transfer("WRITE", scratch, dst, loc, remote, deadline)

    def close(self) -> None:
        with self._lock:
            for _, reg in self._regs.values():
                self._agent.deregister_memory(reg)
            self._regs.clear()
            self._agent.deregister_memory(self._scratch_reg)
            for remote in self._remotes.values():
                self._agent.remove_remote_agent(remote)
            self._remotes.clear()

    def _transfer(
        self,
        op: str,
        local: Any,
        remote_regions: list[tuple[int, int, int]],
        loc: tensor_pb2.NixlLocation,
        remote: str,
        deadline: float,
    ) -> None:
        def start() -> tuple[Any, str]:
            descs = self._agent.get_xfer_descs(remote_regions, loc.mem_type)
            xfer = self._agent.initialize_xfer(op, local, descs, remote)
            return xfer, self._agent.transfer(xfer)

        xfer, state = self._call(loc, start)
        try:
            pause = 0.0
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise TransferTimeoutError(
                        f"NIXL {op} from {loc.agent_name} did not finish by the deadline; aborted"
                    )
                # Spin briefly (a 16 MiB CMA read takes ~3 ms), then back off to 0.2 ms sleeps.
                time.sleep(pause)
                pause = min(2e-4, pause * 2 or 2e-5)
                state = self._call(loc, lambda: self._agent.check_xfer_state(xfer))
            if state != "DONE":
                raise TransferError(f"NIXL {op} from {loc.agent_name} failed ({state})")
        finally:
            # Releasing an in-flight request cancels it: `out` is ours again once this returns.
            try:
                self._call(loc, xfer.release)
            except TransferError:
                # Not cancellable: tearing down the connection cancels every request on it.
                self._forget(loc.agent_name)
                self._call(loc, xfer.release)

    def _call(self, loc: tensor_pb2.NixlLocation, fn: Callable[[], T]) -> T:
        """Run one NIXL call under the lock, mapping a lost peer to ProducerLostError."""
        try:
            with self._lock:
                return fn()
        except TransferError:
            raise
        except Exception as e:  # nixl_cu12._bindings.nixl*Error; not importable by name
            if "Disconnect" in type(e).__name__:
                self._forget(loc.agent_name)
                raise ProducerLostError(f"NIXL producer {loc.agent_name} disconnected") from None
            raise TransferError(f"NIXL call failed: {type(e).__name__}: {e}") from None

    def _remote(self, loc: tensor_pb2.NixlLocation) -> str:
        with self._lock:
            remote = self._remotes.get(loc.agent_name)
        if remote is None:
            try:
                added = self._call(loc, lambda: self._agent.add_remote_agent(loc.agent_metadata))
            except ProducerLostError:
                raise
            except TransferError as e:
                raise ProducerLostError(f"cannot connect to NIXL producer: {e}") from None
            remote = added.decode() if isinstance(added, bytes) else added
            with self._lock:
                self._remotes[loc.agent_name] = remote
        return remote

    def _forget(self, agent_name: str) -> None:
        # Caller holds no lock. Drops the connection so a later handle reconnects cleanly.
        with self._lock:
            remote = self._remotes.pop(agent_name, None)
            if remote is not None:
                # Already torn down by NIXL when this fails; nothing else to release.
                with contextlib.suppress(Exception):
                    self._agent.remove_remote_agent(remote)

    @contextmanager
    def _registered(self, out: torch.Tensor, reused: bool) -> Iterator[Any]:
        key = (out.data_ptr(), out.numel(), str(out.device))
        with self._lock:
            if key in self._regs:
                self._regs.move_to_end(key)
                cached = True
            else:
                cached = reused
                reg = self._agent.register_memory(out)
                if reused:
                    # The cache keeps `out` alive, so its registration can never outlive it.
                    self._regs[key] = (out, reg)
                    if len(self._regs) > _REG_CACHE:
                        _, (_, old) = self._regs.popitem(last=False)
                        self._agent.deregister_memory(old)
            local = self._agent.get_xfer_descs(out)
        try:
            yield local
        finally:
            if not cached:
                with self._lock:
                    self._agent.deregister_memory(reg)

    @contextmanager
    def _scratch_slot(self, deadline: float) -> Iterator[tuple[int, Any]]:
        try:
            i = self._free_scratch.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            raise TransferTimeoutError("too many concurrent NIXL fetches until deadline") from None
        try:
            with self._lock:
                local = self._agent.get_xfer_descs(self._scratch[i, : header.HEADER_USED])
            yield i, local
        finally:
            self._free_scratch.put(i)
