"""gRPC `Language` servicer: translates proto <-> engine calls; pulls image handles first.

Image pulls run concurrently through the transfer layer, off the engine loop, each bounded by the
call's deadline (and the configured pull timeout). Transfer errors end the call with UNAVAILABLE
or DEADLINE_EXCEEDED and the reason; nothing reaches the engine for that request.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import torch

from common.rpc import language_pb2, language_pb2_grpc
from common.transfer import Consumer, TransferError, TransferTimeoutError, host_id
from services.language.engine.engine import Engine, ImageInput, TokenEvent
from services.language.engine.request import SamplingParams
from services.language.engine.scheduler import QueueFull

log = logging.getLogger(__name__)

FINISH = {
    "stop": language_pb2.FINISH_REASON_STOP,
    "length": language_pb2.FINISH_REASON_LENGTH,
    "abort": language_pb2.FINISH_REASON_ABORT,
    "error": language_pb2.FINISH_REASON_ERROR,
}


def sampling_from_proto(p: language_pb2.SamplingParams) -> SamplingParams:
    """Raises ValueError naming the field for nonsensical values."""
    return SamplingParams(
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k,
        min_p=p.min_p,
        seed=p.seed if p.HasField("seed") else None,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        min_tokens=p.min_tokens,
        logprobs=p.logprobs if p.HasField("logprobs") else None,
    )


class LanguageServicer(language_pb2_grpc.LanguageServicer):
    def __init__(
        self, engine: Engine | None, consumer: Consumer, pull_timeout_s: float = 30.0
    ) -> None:
        self.engine = engine  # None while the model loads
        self.consumer = consumer
        self.pull_timeout_s = pull_timeout_s

    async def Generate(
        self, request: language_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[language_pb2.GenerateResponse]:
        engine = self.engine
        if engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        assert engine is not None
        try:
            params = sampling_from_proto(request.sampling)
            prompt = list(request.prompt_token_ids)
            engine.validate(prompt)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        started = time.monotonic()
        images = await self._pull(request, context)
        pull_s = time.monotonic() - started
        try:
            stream = engine.generate(prompt, params, images, request.request_id or None)
            async for event in stream:
                if event.sample is not None:
                    yield language_pb2.GenerateResponse(tokens=_tokens(event))
                if event.finish_reason is not None:
                    yield language_pb2.GenerateResponse(finished=_finished(event, pull_s))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except QueueFull as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"language service busy: {e}")

    async def Abort(
        self, request: language_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> language_pb2.AbortReply:
        if self.engine is None:
            return language_pb2.AbortReply(found=False)
        found = request.request_id in self.engine.running_ids
        self.engine.abort(request.request_id)
        return language_pb2.AbortReply(found=found)

    async def GetInfo(
        self, request: language_pb2.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> language_pb2.GetInfoReply:
        engine = self.engine
        if engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        assert engine is not None
        return language_pb2.GetInfoReply(
            model_type=engine.cfg.model_type,
            max_context_tokens=engine.cfg.text.max_position_embeddings,
            host_id=host_id(),
            block_size=engine.runner.block_size,
        )

    async def _pull(
        self,
        request: language_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext,
    ) -> list[ImageInput]:
        if not request.images:
            return []
        remaining = context.time_remaining()
        budget = self.pull_timeout_s if remaining is None else min(remaining, self.pull_timeout_s)
        deadline = time.monotonic() + budget
        pulls = [self.consumer.fetch_async(img.handle, deadline=deadline) for img in request.images]
        results = await asyncio.gather(*pulls, return_exceptions=True)
        for i, r in enumerate(results):
            if isinstance(r, TransferTimeoutError):
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"image {i}: {r}")
            if isinstance(r, TransferError):
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"image {i}: {r}")
            if isinstance(r, BaseException):
                raise r
        images = []
        for i, (img, tensor) in enumerate(zip(request.images, results, strict=True)):
            assert isinstance(tensor, torch.Tensor)
            g = img.grid_thw
            if not tensor.is_floating_point() or tensor.ndim != 2:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"image {i}: expected a 2-D float tensor, got {tensor.dtype} "
                    f"{tuple(tensor.shape)}",
                )
            # Without a content hash the image must never share prefix-cache blocks.
            content = img.image_hash or f"unhashed-{uuid.uuid4().hex}"
            images.append(ImageInput(tensor, (g.t, g.h, g.w), content))
        return images


def _finished(event: TokenEvent, pull_s: float) -> language_pb2.Finished:
    assert event.finish_reason is not None
    msg = language_pb2.Finished(
        reason=FINISH[event.finish_reason],
        timings=language_pb2.Timings(
            pull_seconds=pull_s, prefill_seconds=event.prefill_s, decode_seconds=event.decode_s
        ),
    )
    if event.usage is not None:
        u = event.usage
        msg.usage.CopyFrom(
            language_pb2.Usage(
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                cached_tokens=u.cached_tokens,
            )
        )
    if event.finish_reason == "error":
        msg.error = "the forward pass failed; see the language service's log"
    return msg


def _tokens(event: TokenEvent) -> language_pb2.Tokens:
    s = event.sample
    assert s is not None
    msg = language_pb2.Tokens(token_ids=[s.token])
    if s.logprob is not None:
        msg.logprobs.append(
            language_pb2.TokenLogprob(
                logprob=s.logprob,
                top=[language_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in s.top_logprobs],
            )
        )
    return msg
