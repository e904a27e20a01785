"""The TensorStore gRPC service (grpc.aio) over a producer's pool: thin, all logic is the pool's."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from common.rpc import tensor_pb2
from common.transfer import wire
from common.transfer.errors import TransferError
from common.transfer.pool import TensorPool


class TensorStoreServicer:
    def __init__(self, pool: TensorPool, chunk_bytes: int) -> None:
        self._pool = pool
        self._chunk = chunk_bytes

    def add_to_server(self, server: grpc.aio.Server) -> None:
        # Registered by hand (not add_TensorStoreServicer_to_server) so that FetchTensor's
        # responses go out pre-encoded, see wire.py.
        handler = grpc.method_handlers_generic_handler(
            wire.SERVICE,
            {
                "FetchTensor": grpc.unary_stream_rpc_method_handler(
                    self.FetchTensor,
                    request_deserializer=tensor_pb2.FetchTensorRequest.FromString,
                ),
                "ReleaseTensor": grpc.unary_unary_rpc_method_handler(
                    self.ReleaseTensor,
                    request_deserializer=tensor_pb2.ReleaseTensorRequest.FromString,
                    response_serializer=tensor_pb2.ReleaseTensorReply.SerializeToString,
                ),
            },
        )
        server.add_generic_rpc_handlers((handler,))

    async def FetchTensor(
        self, request: tensor_pb2.FetchTensorRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        try:
            slot = self._pool.pin(request.id)
        except TransferError as e:
            context.set_trailing_metadata(((wire.REASON_KEY, e.reason),))
            await context.abort(e.code, str(e))
        try:
            memory = self._pool.memory
            end = slot.offset + slot.nbytes
            for start in range(slot.offset, end, self._chunk):
                stop = min(start + self._chunk, end)
                data = memory[start:stop]
                raw = data.numpy() if data.device.type == "cpu" else data.cpu().numpy()
                yield wire.chunk_prefix(stop - start) + raw.data
        finally:
            self._pool.unpin(slot)

    async def ReleaseTensor(
        self, request: tensor_pb2.ReleaseTensorRequest, context: grpc.aio.ServicerContext
    ) -> tensor_pb2.ReleaseTensorReply:
        return tensor_pb2.ReleaseTensorReply(released=self._pool.release(request.id))
