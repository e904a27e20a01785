"""One chat request through the disaggregated system.

1. Pick the language replica with the fewest outstanding requests (its host id tells encoders
   whether shared memory can reach it).
2. Render the chat template, tokenize.
3. Encode every image in parallel, each on the encoder ranked first for its content hash
   (rendezvous hashing: cache affinity), retrying on the least-loaded other encoders when it
   fails or does not answer within `encode_timeout_s`.
4. Expand each image placeholder to the image's token count and stream `Language.Generate`.
   A replica that cannot be reached before the first token (stopping, dead, not yet caught by
   health checks) is marked down and the request starts over on another one, images included:
   their handles may be bound to the first replica's host.
5. Detokenize incrementally, apply stop strings (aborting the generation downstream), and report
   usage and per-stage timings at the end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from common.config import ModelConfig
from common.rpc import encoder_pb2, encoder_pb2_grpc, language_pb2, language_pb2_grpc
from common.tokenizer import ChatTokenizer
from services.gateway.backends import Backend, BackendPool
from services.gateway.detokenizer import IncrementalDetokenizer
from services.gateway.media import content_hash
from services.gateway.metrics import GatewayMetrics
from services.gateway.openai_protocol import ApiError, ChatRequest
from services.language.inputs import expand_image_pads

log = logging.getLogger(__name__)

# Encoder failures worth trying another encoder for (the image itself is not at fault).
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}
FINISH = {
    language_pb2.FINISH_REASON_STOP: "stop",
    language_pb2.FINISH_REASON_LENGTH: "length",
    language_pb2.FINISH_REASON_ABORT: "abort",
    language_pb2.FINISH_REASON_ERROR: "error",
}


@dataclass(frozen=True)
class OrchestratorConfig:
    encode_timeout_s: float = 30.0  # one Encode attempt; a frozen encoder costs at most this
    generate_timeout_s: float = 600.0  # the whole Language.Generate stream
    max_encode_attempts: int = 3
    # Language replicas tried for one request when one is unreachable before its first token
    # (a replica stopping or dead that health checks have not caught yet).
    max_generate_attempts: int = 2


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Final:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    timings: dict[str, float]


@dataclass
class _Encoded:
    ref: language_pb2.ImageRef
    n_tokens: int
    seconds: float  # the Encode call as the gateway saw it
    preprocess_s: float  # inside the encoder (0 on a cache hit)
    forward_s: float


class Orchestrator:
    def __init__(
        self,
        cfg: ModelConfig,
        tokenizer: ChatTokenizer,
        encoders: BackendPool | None,
        language: BackendPool,
        metrics: GatewayMetrics,
        options: OrchestratorConfig | None = None,
    ) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.encoders, self.language = encoders, language
        self.metrics = metrics
        self.options = options or OrchestratorConfig()

    async def chat(self, req: ChatRequest) -> AsyncGenerator[Delta | Final, None]:
        started = time.monotonic()
        tried: list[Backend] = []
        while True:
            backend = self.language.least_loaded(exclude=tried)
            if backend is None:
                seen = f" (tried {', '.join(b.address for b in tried)})" if tried else ""
                raise ApiError(503, f"no healthy language service{seen}")
            try:
                async for item in self._chat_on(backend, req):
                    yield item
            except _Unreachable as e:  # raised before anything was yielded
                self.language.mark_down(backend, e.reason)
                tried.append(backend)
                if len(tried) >= self.options.max_generate_attempts:
                    raise ApiError(503, f"language service: {e.reason}") from None
                self.metrics.language_retries.inc()
                continue
            self.metrics.e2e.observe(time.monotonic() - started)
            return

    async def _chat_on(
        self, backend: Backend, req: ChatRequest
    ) -> AsyncGenerator[Delta | Final, None]:
        """The request on one language replica. Raises _Unreachable before its first item if
        the replica cannot be reached (images are encoded again for the next one: their
        handles may be bound to this replica's host)."""
        info = await self._info(backend)
        try:
            prompt = self.tokenizer.encode(self.tokenizer.render(req.messages))
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        images: list[_Encoded] = []
        if req.images:
            if self.cfg.image_token_id is None or self.encoders is None:
                raise ApiError(400, "this model takes no images", "messages")
            images = await self._encode_all(req.images, str(info.get("host_id", "")))
            prompt = expand_image_pads(
                prompt, self.cfg.image_token_id, [e.n_tokens for e in images]
            )
        context = int(str(info.get("max_context_tokens") or self.cfg.text.max_position_embeddings))
        if len(prompt) >= context:
            raise ApiError(400, f"prompt is {len(prompt)} tokens; the context is {context}")
        max_tokens = min(req.max_tokens or context, context - len(prompt))
        # Images are encoded in parallel: the slowest one is the stage's cost.
        slowest = max(images, key=lambda e: e.seconds, default=None)
        timings = {"preprocess": 0.0, "encode": 0.0}
        if slowest is not None:
            timings["preprocess"] = slowest.preprocess_s
            timings["encode"] = slowest.seconds - slowest.preprocess_s
        generate = language_pb2.GenerateRequest(
            request_id=req.request_id,
            prompt_token_ids=prompt,
            images=[e.ref for e in images],
            sampling=_sampling(req, max_tokens),
        )
        async for item in self._generate(backend, generate, req, timings):
            yield item

    async def _generate(
        self,
        backend: Backend,
        request: language_pb2.GenerateRequest,
        req: ChatRequest,
        timings: dict[str, float],
    ) -> AsyncIterator[Delta | Final]:
        stub = language_pb2_grpc.LanguageStub(backend.channel)
        detok = IncrementalDetokenizer(self.tokenizer, req.stop)
        call = stub.Generate(request, timeout=self.options.generate_timeout_s)
        backend.outstanding += 1
        completion, first = 0, True
        t0 = time.monotonic()
        try:
            async for msg in call:
                if msg.HasField("tokens"):
                    ids = list(msg.tokens.token_ids)
                    completion += len(ids)
                    if first:
                        self.metrics.ttft.observe(time.monotonic() - t0)
                        first = False
                    text = detok.add(ids)
                    yield Delta(text, ids, _logprobs(self.tokenizer, ids, msg.tokens))
                    if detok.stopped:
                        call.cancel()  # a stop string ended it: free the KV cache downstream
                        yield self._final("stop", request, completion, 0, timings, None)
                        return
                    continue
                f = msg.finished
                rest = detok.finish()
                if rest:
                    yield Delta(rest, [])
                if f.reason == language_pb2.FINISH_REASON_ERROR:
                    raise ApiError(500, f"generation failed: {f.error}")
                yield self._final(
                    FINISH[f.reason],
                    request,
                    f.usage.completion_tokens,
                    f.usage.cached_tokens,
                    timings,
                    f.timings,
                )
                return
        except grpc.aio.AioRpcError as e:
            if first and e.code() == grpc.StatusCode.UNAVAILABLE:
                raise _Unreachable(f"{backend.address}: {e.details() or 'unavailable'}") from None
            raise _language_error(e) from None
        finally:
            backend.outstanding -= 1
            if not call.done():
                call.cancel()

    def _final(
        self,
        reason: str,
        request: language_pb2.GenerateRequest,
        completion: int,
        cached: int,
        timings: dict[str, float],
        lang: language_pb2.Timings | None,
    ) -> Final:
        if lang is not None:
            timings.update(
                transfer=lang.pull_seconds, prefill=lang.prefill_seconds, decode=lang.decode_seconds
            )
        return Final(reason, len(request.prompt_token_ids), completion, cached, timings)

    async def _info(self, backend: Backend) -> dict[str, object]:
        if not backend.info:
            stub = language_pb2_grpc.LanguageStub(backend.channel)
            try:
                reply = await stub.GetInfo(language_pb2.GetInfoRequest(), timeout=5.0)
            except grpc.aio.AioRpcError as e:
                raise _Unreachable(f"{backend.address}: {e.details() or e.code().name}") from None
            backend.info = {
                "host_id": reply.host_id,
                "max_context_tokens": reply.max_context_tokens,
            }
        return backend.info

    async def _encode_all(self, images: list[bytes], consumer_host: str) -> list[_Encoded]:
        tasks = [self._encode_one(i, data, consumer_host) for i, data in enumerate(images)]
        return list(await asyncio.gather(*tasks))

    async def _encode_one(self, index: int, data: bytes, consumer_host: str) -> _Encoded:
        assert self.encoders is not None
        key = content_hash(data)
        tried: list[str] = []
        request = encoder_pb2.EncodeRequest(
            images=[encoder_pb2.ImageData(data=data, content_hash=key)], consumer_host=consumer_host
        )
        # The encoder that owns this content hash first (its cache), then the least loaded.
        ranked = self.encoders.rank(key)
        order = ranked[:1] + sorted(ranked[1:], key=lambda b: b.outstanding)
        for backend in order[: self.options.max_encode_attempts]:
            stub = encoder_pb2_grpc.EncoderStub(backend.channel)
            backend.outstanding += 1
            t0 = time.monotonic()
            try:
                reply = await stub.Encode(request, timeout=self.options.encode_timeout_s)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    detail = (e.details() or "").removeprefix("image 0: ")
                    raise ApiError(400, f"image {index}: {detail}", "messages") from None
                if e.code() not in _RETRYABLE:
                    raise ApiError(502, f"encoder {backend.address}: {e.details()}") from None
                tried.append(f"{backend.address} ({e.code().name})")
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self.encoders.mark_down(backend, e.code().name)
                self.metrics.encoder_retries.inc()
                continue
            finally:
                backend.outstanding -= 1
            out = reply.images[0]
            self.metrics.images.labels("hit" if out.cache_hit else "miss").inc()
            g = out.grid_thw
            ref = language_pb2.ImageRef(
                handle=out.handle,
                grid_thw=language_pb2.GridTHW(t=g.t, h=g.h, w=g.w),
                image_hash=out.image_hash,
            )
            return _Encoded(
                ref,
                out.n_tokens,
                time.monotonic() - t0,
                out.preprocess_seconds,
                out.encode_seconds,
            )
        detail = "; ".join(tried) if tried else "no healthy encoder"
        raise ApiError(503, f"image {index}: could not be encoded: {detail}")


def _sampling(req: ChatRequest, max_tokens: int) -> language_pb2.SamplingParams:
    s = req.sampling
    p = language_pb2.SamplingParams(
        max_tokens=max_tokens,
        temperature=s["temperature"],
        top_p=s["top_p"],
        top_k=s["top_k"],
        min_p=s["min_p"],
        repetition_penalty=s["repetition_penalty"],
        presence_penalty=s["presence_penalty"],
        frequency_penalty=s["frequency_penalty"],
        stop_token_ids=list(s["stop_token_ids"]),
        ignore_eos=s["ignore_eos"],
        min_tokens=min(s["min_tokens"], max_tokens),
    )
    if s["seed"] is not None:
        p.seed = s["seed"] & ((1 << 64) - 1)
    if s["logprobs"] is not None:
        p.logprobs = s["logprobs"]
    return p


def _logprobs(
    tokenizer: ChatTokenizer, ids: list[int], tokens: language_pb2.Tokens
) -> list[dict[str, Any]]:
    out = []
    for tid, lp in zip(ids, tokens.logprobs, strict=False):
        out.append(
            {
                "token": _token_text(tokenizer, tid),
                "logprob": lp.logprob,
                "bytes": list(_token_text(tokenizer, tid).encode()),
                "top_logprobs": [
                    {
                        "token": _token_text(tokenizer, t.token_id),
                        "logprob": t.logprob,
                        "bytes": list(_token_text(tokenizer, t.token_id).encode()),
                    }
                    for t in lp.top
                ],
            }
        )
    return out


def _token_text(tokenizer: ChatTokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


class _Unreachable(Exception):
    """A language replica failed before the request's first token: safe to try another."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _language_error(e: grpc.aio.AioRpcError) -> ApiError:
    code = e.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ApiError(400, e.details() or "invalid request")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ApiError(429, e.details() or "language service busy")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ApiError(504, e.details() or "generation timed out")
    return ApiError(503, f"language service: {e.details() or code.name}")
