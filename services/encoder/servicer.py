"""gRPC `Encoder` servicer: translates proto <-> `Encoder.encode` and errors -> status codes."""

from __future__ import annotations

import asyncio

import grpc

from common.contract import ContractError
from common.rpc import encoder_pb2, encoder_pb2_grpc
from common.transfer import TransferError
from services.encoder.batcher import ForwardError
from services.encoder.encoder import EncodedImage, EncodedVideo, Encoder, EncoderBusy, VideoJob

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
        host = request.consumer_host or None
        try:
            videos = [_job(v, encoder, i) for i, v in enumerate(request.videos)]
            if not images and not videos:
                raise ValueError("the request has no images or videos")
            results = await encoder.encode(images, host, deadline) if images else []
            try:
                clips = await encoder.encode_videos(videos, host, deadline) if videos else []
            except BaseException:
                for r in results:  # all or nothing: nobody will receive these
                    encoder.producer.release(r.handle.id)
                raise
        except ValueError as e:  # ImageError / VideoError ("video 0: the file has no ...")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EncoderBusy as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except TransferError as e:  # PoolExhaustedError -> RESOURCE_EXHAUSTED
            await context.abort(e.code, f"cannot publish the image tensor: {e}")
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while encoding")
        except ForwardError as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        return encoder_pb2.EncodeReply(
            images=[_to_proto(r) for r in results], videos=[_video_to_proto(v) for v in clips]
        )


def _job(m: encoder_pb2.VideoData, encoder: Encoder, index: int) -> VideoJob:
    try:
        sampling = encoder.video_cfg.sampling(m.fps or None, m.max_frames or None)
    except ContractError as e:
        raise ValueError(f"video {index}: {e}") from None
    return VideoJob(m.data, sampling, m.first_patch, m.num_patches)


def _video_to_proto(r: EncodedVideo) -> encoder_pb2.EncodedVideo:
    t, h, w = r.grid_thw
    return encoder_pb2.EncodedVideo(
        handle=r.handle,
        grid_thw=encoder_pb2.GridTHW(t=t, h=h, w=w),
        n_tokens=r.n_tokens,
        video_hash=r.video_hash,
        cache_hit=r.cache_hit,
        timestamps=list(r.chunk.timestamps),
        first_patch=r.chunk.first_patch,
        total_patches=r.chunk.total_patches,
        frames_decoded=0 if r.cache_hit else r.chunk.frames_decoded,
        preprocess_seconds=r.preprocess_s,
        encode_seconds=r.forward_s,
    )


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
