"""gRPC `Encoder` servicer: translates proto <-> `Encoder.encode` and errors -> status codes."""

from __future__ import annotations

import asyncio

import grpc

from common.rpc import encoder_pb2, encoder_pb2_grpc
from common.transfer import TransferError
from services.encoder.batcher import ForwardError
from services.encoder.encoder import EncodedImage, Encoder, EncoderBusy

# A deadline further away than this is treated as none (some clients send "infinite" ones).
_NO_DEADLINE_S = 1e7


class EncoderServicer(encoder_pb2_grpc.EncoderServicer):
    def __init__(self, encoder: Encoder | None) -> None:
        self.encoder = encoder  # None while the weights load
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new calls from now on; wait up to `timeout` s for the running ones to answer.
        True when none is left."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def Encode(
        self, request: encoder_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> encoder_pb2.EncodeReply:
        encoder = self.encoder
        if encoder is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        if self.draining:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "this encoder is shutting down; retry another one"
            )
        assert encoder is not None
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._encode(encoder, request, context)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _encode(
        self,
        encoder: Encoder,
        request: encoder_pb2.EncodeRequest,
        context: grpc.aio.ServicerContext,
    ) -> encoder_pb2.EncodeReply:
        remaining = context.time_remaining()
        deadline = None
        if remaining is not None and remaining < _NO_DEADLINE_S:
            deadline = asyncio.get_running_loop().time() + remaining
        images = [img.data for img in request.images]
        try:
            results = await encoder.encode(images, request.consumer_host or None, deadline)
        except ValueError as e:  # includes ImageError ("image 2: cannot decode image: ...")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EncoderBusy as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except TransferError as e:  # PoolExhaustedError -> RESOURCE_EXHAUSTED
            await context.abort(e.code, f"cannot publish the image tensor: {e}")
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while encoding")
        except ForwardError as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        return encoder_pb2.EncodeReply(images=[_to_proto(r) for r in results])


def _to_proto(r: EncodedImage) -> encoder_pb2.EncodedImage:
    t, h, w = r.grid_thw
    return encoder_pb2.EncodedImage(
        handle=r.handle,
        grid_thw=encoder_pb2.GridTHW(t=t, h=h, w=w),
        n_tokens=r.n_tokens,
        image_hash=r.image_hash,
        cache_hit=r.cache_hit,
        preprocess_seconds=r.preprocess_s,
        encode_seconds=r.forward_s,
    )
