"""gRPC `Language` servicer: converts the wire once, pulls the images, delegates to the engine.

In order, for one Generate call:
1. the request is converted (`common.contract.wire`) and checked against this replica's limits
   (`check_prompt`), and its structured-output constraint compiled (off the loop, cached): cause
   `request`, INVALID_ARGUMENT naming the problem;
2. a waiting slot and the image bytes are reserved in the engine before anything is pulled:
   cause `replica`, RESOURCE_EXHAUSTED when there is no room;
3. every handle is pulled concurrently in worker threads, each bounded by the call's deadline
   (and the pull timeout), and its identity digest computed there: a failure answers with the
   transfer error's own code, cause `image`, naming the image and its producer, so that the
   caller re-encodes the image instead of blaming this replica;
4. the engine streams tokens. An engine that failed (a tensor-parallel rank lost) answers
   UNAVAILABLE, cause `replica`, so that the caller moves the request to another replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from common.contract import (
    Cause,
    ContractError,
    Fault,
    ImageRef,
    PromptLimits,
    ReplicaInfo,
    StructuredOutput,
    check_prompt,
)
from common.contract.videos import VideoRef
from common.contract.wire import (
    finish_to_proto,
    image_ref_from_proto,
    replica_info_to_proto,
    sampling_from_proto,
    structured_from_proto,
    video_ref_from_proto,
)
from common.rpc import language_pb2, language_pb2_grpc
from common.transfer import Consumer, TransferError
from common.transfer.handle import producer_of
from services.language.engine.engine import Engine, ImageInput, TokenEvent, in_prompt_order
from services.language.engine.errors import EngineFailed
from services.language.engine.scheduler import QueueFull

log = logging.getLogger(__name__)

_LOADING = Fault(Cause.REPLICA, grpc.StatusCode.UNAVAILABLE, "the model is still loading")
_DRAINING = Fault(
    Cause.REPLICA, grpc.StatusCode.UNAVAILABLE, "this language replica is shutting down"
)


class LanguageServicer(language_pb2_grpc.LanguageServicer):
    def __init__(
        self, engine: Engine | None, consumer: Consumer, info: ReplicaInfo | None = None,
        pull_timeout_s: float = 30.0,
    ) -> None:  # fmt: skip
        self.engine = engine  # None while the model loads
        self.info = info
        self.consumer = consumer
        self.pull_timeout_s = pull_timeout_s
        self.draining = False  # set by the service's drain: new calls are refused

    async def Generate(
        self, request: language_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[language_pb2.GenerateResponse]:
        engine = self.engine
        if engine is None:
            await _LOADING.abort(context)
        if self.draining:
            await _DRAINING.abort(context)
        assert engine is not None
        cfg = engine.cfg
        merge = cfg.vision.spatial_merge_size if cfg.vision else 2
        limits = PromptLimits(cfg.text.vocab_size, engine.max_model_len, cfg.image_token_id, merge,
                              cfg.video_token_id)  # fmt: skip
        prompt = list(request.prompt_token_ids)
        try:
            params = sampling_from_proto(request.sampling)
            refs = [image_ref_from_proto(m, merge, i) for i, m in enumerate(request.images)]
            videos = [video_ref_from_proto(m, merge, i) for i, m in enumerate(request.videos)]
            found = check_prompt(prompt, [r.n_tokens for r in refs], params, limits,
                                 [v.patch_counts(merge) for v in videos])  # fmt: skip
            if params.structured is not None:
                await self._compile(engine, params.structured)
        except ContractError as e:
            await Fault(Cause.REQUEST, grpc.StatusCode.INVALID_ARGUMENT, str(e)).abort(context)
        try:
            nbytes = sum(r.handle.nbytes for r in refs) + sum(v.handle.nbytes for v in videos)
            reservation = engine.reserve(nbytes)
        except QueueFull as e:
            fault = Fault(Cause.REPLICA, grpc.StatusCode.RESOURCE_EXHAUSTED, f"busy: {e}")
            await fault.abort(context)
        except EngineFailed as e:
            await _failed(e).abort(context)
        started = time.monotonic()
        try:
            media: list[ImageRef | VideoRef] = [*refs, *videos]
            pulled = await self._pull(media, context, engine, self._deadline(context))
        except BaseException:
            reservation.release()
            raise
        pull_s = time.monotonic() - started
        rid = request.request_id or None
        images, spans = in_prompt_order([p[0] for p in pulled[: len(refs)]], found.images,
                                        pulled[len(refs) :], found.videos)  # fmt: skip
        stream = engine.generate_batches(prompt, params, images, rid, reservation, spans)
        try:
            async for batch in stream:  # per sequence, one message for every step ready
                for msg in _messages(batch, pull_s):
                    yield msg
        except EngineFailed as e:
            await _failed(e).abort(context)
        except ValueError as e:  # the request id is already running here
            await Fault(Cause.REQUEST, grpc.StatusCode.INVALID_ARGUMENT, str(e)).abort(context)

    async def Abort(
        self, request: language_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> language_pb2.AbortReply:
        if self.engine is None:
            return language_pb2.AbortReply(found=False)
        found = request.request_id in self.engine.running_ids
        self.engine.abort(request.request_id)
        return language_pb2.AbortReply(found=found)

    async def CompileGrammar(
        self, request: language_pb2.StructuredOutput, context: grpc.aio.ServicerContext
    ) -> language_pb2.CompileGrammarReply:
        engine = self.engine
        if engine is None:
            await _LOADING.abort(context)
        assert engine is not None
        started = time.monotonic()
        try:
            cached = await self._compile(engine, structured_from_proto(request))
        except ContractError as e:
            await Fault(Cause.REQUEST, grpc.StatusCode.INVALID_ARGUMENT, str(e)).abort(context)
        seconds = 0.0 if cached else time.monotonic() - started
        return language_pb2.CompileGrammarReply(cached=cached, compile_seconds=seconds)

    async def _compile(self, engine: Engine, spec: StructuredOutput) -> bool:
        """Compile (or find) the grammar; whether it was cached. Raises ContractError."""
        if engine.grammars is None:
            raise ContractError("this replica takes no structured outputs", "structured_outputs")
        _, cached = await engine.grammars.compile(spec)
        return cached

    async def GetInfo(
        self, request: language_pb2.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> language_pb2.GetInfoReply:
        if self.engine is None or self.info is None:
            await _LOADING.abort(context)
        assert self.info is not None
        return replica_info_to_proto(self.info)

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        budget = self.pull_timeout_s if remaining is None else min(remaining, self.pull_timeout_s)
        return time.monotonic() + budget

    async def _pull(
        self,
        refs: list[ImageRef | VideoRef],
        context: grpc.aio.ServicerContext,
        engine: Engine,
        deadline: float,
    ) -> list[list[ImageInput]]:
        """Every image's and video's tensor, pulled concurrently (an image as one item, a video
        as its temporal patches); aborts the call with an image fault (index: images first,
        then videos)."""

        def pull(ref: ImageRef | VideoRef) -> list[ImageInput]:
            tensor = self.consumer.fetch(ref.handle, deadline=deadline)
            if isinstance(ref, VideoRef):
                return ImageInput.video_patches(tensor, ref.grid)
            return [ImageInput.of(tensor, ref.grid)]

        results = await asyncio.gather(*(asyncio.to_thread(pull, r) for r in refs),
                                       return_exceptions=True)  # fmt: skip
        width = (1 + engine.cfg.num_deepstack) * engine.cfg.text.hidden_size
        images: list[list[ImageInput]] = []
        for i, (ref, r) in enumerate(zip(refs, results, strict=True)):
            producer = producer_of(ref.handle)
            if isinstance(r, TransferError):
                message = f"image {i}: cannot pull its tensor from {producer}: {r}"
                await Fault(Cause.IMAGE, r.code, message, i, producer, r.reason).abort(context)
            if isinstance(r, BaseException):
                raise r
            dtype, rows = r[0].tensor.dtype, sum(p.tensor.shape[0] for p in r)
            if (
                not dtype.is_floating_point
                or any(p.tensor.shape[1:] != (width,) for p in r)
                or (rows != ref.n_tokens)
            ):
                message = (
                    f"image {i}: its tensor from {producer} is {dtype} with {rows} rows of "
                    f"{tuple(r[0].tensor.shape[1:])}; expected a float tensor "
                    f"[{ref.n_tokens}, {width}]"
                )
                await Fault(Cause.IMAGE, grpc.StatusCode.INVALID_ARGUMENT, message, i, producer,
                            "bad_tensor").abort(context)  # fmt: skip
            images.append(r)
        return images


def _failed(e: EngineFailed) -> Fault:
    return Fault(Cause.REPLICA, grpc.StatusCode.UNAVAILABLE, f"this language replica failed: {e}")


def _messages(batch: list[TokenEvent], pull_s: float) -> list[language_pb2.GenerateResponse]:
    """A batch of events (any sequences, in order) as messages: one `tokens` per run of one
    sequence's tokens, and each sequence's `finished` after its tokens."""
    out: list[language_pb2.GenerateResponse] = []
    run: list[TokenEvent] = []
    for event in batch:
        if event.sample is not None:
            if run and run[-1].index != event.index:
                out.append(language_pb2.GenerateResponse(tokens=_tokens(run)))
                run = []
            run.append(event)
        if event.finish_reason is not None:
            if run:
                out.append(language_pb2.GenerateResponse(tokens=_tokens(run)))
                run = []
            out.append(language_pb2.GenerateResponse(finished=_finished(event, pull_s)))
    if run:
        out.append(language_pb2.GenerateResponse(tokens=_tokens(run)))
    return out


def _finished(event: TokenEvent, pull_s: float) -> language_pb2.Finished:
    assert event.finish_reason is not None
    msg = language_pb2.Finished(
        index=event.index,
        reason=finish_to_proto(event.finish_reason),
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


def _tokens(events: list[TokenEvent]) -> language_pb2.Tokens:
    msg = language_pb2.Tokens(index=events[0].index)
    for lp, alternatives in events[0].prompt_logprobs:
        alts = [language_pb2.TopLogprob(token_id=t, logprob=v) for t, v in alternatives]
        msg.prompt_logprobs.append(language_pb2.TokenLogprob(logprob=lp, top=alts))
    for event in events:
        s = event.sample
        assert s is not None
        msg.token_ids.append(s.token)
        if s.logprob is not None:
            top = [language_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in s.top_logprobs]
            msg.logprobs.append(language_pb2.TokenLogprob(logprob=s.logprob, top=top))
    return msg
