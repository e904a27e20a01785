"""gRPC backend: the consumer streams raw chunks from the producer's TensorStore service into its
buffer, then acknowledges with ReleaseTensor. Works everywhere; the fallback across hosts
without NIXL, and what CI exercises without RDMA."""

from __future__ import annotations

import logging
import threading
import time

import grpc
import numpy as np
import torch

from common.rpc import tensor_pb2
from common.tls import ClientTLS
from common.tls import channel as tls_channel
from common.transfer import metrics, wire
from common.transfer.backends.base import ExportContext
from common.transfer.config import MIB, TransferConfig
from common.transfer.errors import (
    BY_REASON,
    ProducerLostError,
    TransferError,
    TransferTimeoutError,
)
from common.transfer.pool import Slot

log = logging.getLogger(__name__)

# Chunks are at most 4 MiB (TransferConfig); leave room for the message framing.
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_receive_message_length", 4 * MIB + 64),
    ("grpc.max_send_message_length", 4 * MIB + 64),
]


class Exporter:
    def __init__(self, ctx: ExportContext) -> None:
        if not ctx.store_address:
            raise ValueError("the grpc backend needs the address where TensorStore is served")
        self._address = ctx.store_address

    def locate(self, slot: Slot, handle: tensor_pb2.TensorHandle) -> None:
        handle.grpc.address = self._address

    def poll(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Stub:
    def __init__(self, address: str, tls: ClientTLS | None) -> None:
        self.channel = tls_channel(address, tls, CHANNEL_OPTIONS)
        # Raw responses: wire.chunk_data slices the data out without a protobuf copy.
        self.fetch = self.channel.unary_stream(
            wire.FETCH_METHOD,
            request_serializer=tensor_pb2.FetchTensorRequest.SerializeToString,
        )
        self.release = self.channel.unary_unary(
            wire.RELEASE_METHOD,
            request_serializer=tensor_pb2.ReleaseTensorRequest.SerializeToString,
            response_deserializer=tensor_pb2.ReleaseTensorReply.FromString,
        )


class Reader:
    def __init__(self, config: TransferConfig) -> None:
        self._tls = config.client_tls
        self._stubs: dict[str, _Stub] = {}
        self._lock = threading.Lock()

    def read(
        self, handle: tensor_pb2.TensorHandle, out: torch.Tensor, deadline: float, reused: bool
    ) -> None:
        stub = self._stub(handle.grpc.address)
        # Stream into host memory; a device buffer gets one copy at the end.
        host = out if out.device.type == "cpu" else torch.empty_like(out, device="cpu")
        dst = host.numpy()  # [nbytes] uint8
        pos = 0
        call = stub.fetch(tensor_pb2.FetchTensorRequest(id=handle.id), timeout=_left(deadline))
        try:
            for message in call:
                data = wire.chunk_data(message)
                if pos + len(data) > handle.nbytes:
                    raise TransferError(f"producer sent more than {handle.nbytes} bytes")
                dst[pos : pos + len(data)] = np.frombuffer(data, dtype=np.uint8)
                pos += len(data)
        except grpc.RpcError as e:
            raise _error(e, handle.id) from None
        finally:
            call.cancel()  # no-op when complete; stops the stream on any early exit
        if pos != handle.nbytes:
            raise TransferError(f"stream of {handle.id} ended after {pos}/{handle.nbytes} bytes")
        if host is not out:
            out.copy_(host)

    def acknowledge(self, handle: tensor_pb2.TensorHandle, deadline: float) -> None:
        # The data is already complete and checked: a failed ack only delays the producer's
        # reclaim to lease expiry, so it is logged and counted, not raised.
        try:
            self._stub(handle.grpc.address).release(
                tensor_pb2.ReleaseTensorRequest(id=handle.id), timeout=max(_left(deadline), 0.05)
            )
        except grpc.RpcError as e:
            log.warning("acknowledging %s failed: %s", handle.id, e.code())
            metrics.FAILURES.labels("grpc", "consumer", "ack_failed").inc()

    def close(self) -> None:
        with self._lock:
            for stub in self._stubs.values():
                stub.channel.close()
            self._stubs.clear()

    def _stub(self, address: str) -> _Stub:
        with self._lock:
            if address not in self._stubs:
                self._stubs[address] = _Stub(address, self._tls)
            return self._stubs[address]


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TransferTimeoutError("fetch deadline passed before the transfer started")
    return left


def _error(e: grpc.RpcError, tensor_id: str) -> TransferError:
    """The TransferError a failed call stands for (the server names it in trailing metadata)."""
    assert isinstance(e, grpc.Call)
    reason = dict(e.trailing_metadata() or ()).get(wire.REASON_KEY)
    if isinstance(reason, str) and reason in BY_REASON:
        return BY_REASON[reason](e.details() or reason)
    code = e.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TransferTimeoutError(f"fetch of {tensor_id} hit its deadline; stream cancelled")
    if code == grpc.StatusCode.UNAVAILABLE:
        return ProducerLostError(f"producer of {tensor_id} unreachable: {e.details()}")
    return TransferError(f"fetch of {tensor_id} failed: {code.name} {e.details()}")
