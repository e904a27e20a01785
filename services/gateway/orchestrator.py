"""One chat request through the disaggregated system.

1. Render the chat template and tokenize (off the event loop for long prompts); expand each
   image placeholder to the image's token count, predicted from its size as the encoder will
   resize it (`common.contract.images`), and each video placeholder to its timestamped runs of
   video-pad tokens, planned from its container header (`services.gateway.videos`).
2. Pick the language replica with the fewest outstanding requests; its `ReplicaInfo` (cached)
   gives `max_model_len` and its host id (encoders on that host may use shared memory). The
   prompt is checked against it (`check_prompt`): a bad request is refused before any encoder
   works on it.
3. Encode every image and video chunk in parallel, each on the encoder ranked first for its
   content hash (a chunk: the video's hash and its first patch)
   (rendezvous hashing: cache affinity), retrying on the least-loaded other encoders when it
   fails or does not answer within `encode_timeout_s`.
4. Stream `Language.Generate`. Before the first token, a failure is blamed on the role that
   caused it (`common.contract.faults`):
   - an image the replica could not pull (its encoder died, its lease ended, ...): the images
     are encoded again, away from that encoder, and the request retried on the same replica;
   - the replica itself unreachable, or not serving: it is marked down and the request starts
     over on another replica, images included (their handles may be bound to the first
     replica's host);
   - the replica full: another replica, else 429 with Retry-After.
   Everything stays within the request's deadline (`request_timeout_s`). Handles that will not
   be pulled are released at their encoder at once instead of waiting for their lease.
   A request with a structured-output constraint and images first has the replica compile
   its grammar (`CompileGrammar`): a constraint that does not compile is a 400 before any
   image is encoded (without images, Generate itself refuses it before any work).
5. Detokenize each of the request's n sequences incrementally, apply stop strings (aborting
   that sequence downstream), and report usage and per-stage timings at the end of each.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from common.config import ModelConfig
from common.contract import (
    Cause,
    ContractError,
    Fault,
    FinishReason,
    ImageRef,
    PreprocessConfig,
    PromptLimits,
    ReplicaInfo,
    StructuredOutput,
    VideoPlan,
    VideoPreprocessConfig,
    VideoRef,
    check_prompt,
    check_token_ids,
    expand_image_pads,
    expand_video_placeholders,
    fault_of,
    image_grid,
    image_token_count,
)
from common.contract.wire import (
    finish_from_proto,
    generate_request,
    image_ref_from_encoded,
    replica_info_from_proto,
    structured_to_proto,
    video_ref_from_encoded,
)
from common.rpc import (
    encoder_pb2,
    encoder_pb2_grpc,
    language_pb2,
    language_pb2_grpc,
    tensor_pb2,
    tensor_pb2_grpc,
)
from common.tokenizer import ChatTokenizer
from services.gateway.backends import Backend, BackendPool
from services.gateway.detokenizer import IncrementalDetokenizer
from services.gateway.media import Image
from services.gateway.metrics import GatewayMetrics
from services.gateway.openai_protocol import ApiError, ChatRequest
from services.gateway.reasoning import THINK_END, reasoning_open
from services.gateway.videos import VideoChunk, plan_chunks

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
# Image pulls that a fresh encode fixes (an encoder gone, a handle lost or expired, a pull too
# slow, bytes damaged on the way, a shm handle sent to the wrong host).
_IMAGE_RETRYABLE = {"producer_lost", "not_found", "expired", "timeout", "checksum", "wrong_host",
                    "error"}  # fmt: skip
_TOKENIZE_INLINE_CHARS = 16 * 1024  # longer prompts are tokenized off the event loop
_RELEASE_TIMEOUT_S = 2.0
_COMPILE_TIMEOUT_S = 30.0  # a grammar compile at the replica (seconds for large schemas)


@dataclass(frozen=True)
class OrchestratorConfig:
    encode_timeout_s: float = 30.0  # one Encode attempt; a frozen encoder costs at most this
    request_timeout_s: float = 600.0  # the whole request: encodes, retries and generation
    max_encode_attempts: int = 3  # encoders tried for one image in one round
    max_image_rounds: int = 3  # encode + Generate rounds when images fail to be pulled
    max_generate_attempts: int = 2  # language replicas tried when one is unreachable or full
    max_in_flight: int = 1024  # requests at once beyond which new ones get 429
    reasoning_parser: str | None = None  # "qwen3": replies' <think> blocks are reasoning
    # Patches of a video one Encode call gets at most; longer videos are cut into chunks of
    # whole temporal patches, encoded in parallel (the encoders' --max-batch-patches default).
    video_chunk_patches: int = 16384


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    index: int = 0  # the sequence, in [0, n)
    # With the first tokens when prompt logprobs were asked: one entry per prompt token from
    # the second on, in `_logprobs`' shape.
    prompt_logprobs: list[dict[str, Any]] | None = None


@dataclass
class Final:
    """The end of one sequence (a request of n sequences yields n of them)."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    timings: dict[str, float]
    index: int = 0


@dataclass
class _Encoded:
    ref: ImageRef | VideoRef
    backend: Backend  # the encoder holding the tensor (it also serves TensorStore)
    seconds: float  # the Encode call as the gateway saw it
    preprocess_s: float  # inside the encoder (0 on a cache hit)
    forward_s: float


@dataclass(frozen=True)
class _Prompt:
    ids: list[int]  # image placeholders expanded
    counts: list[int]  # image tokens per image, predicted from its size
    chunks: list[VideoChunk] = field(default_factory=list)  # the videos, as encoded


class Orchestrator:
    def __init__(
        self,
        cfg: ModelConfig,
        tokenizer: ChatTokenizer,
        encoders: BackendPool | None,
        language: BackendPool,
        metrics: GatewayMetrics,
        options: OrchestratorConfig | None = None,
        preprocess: PreprocessConfig | None = None,
        video: VideoPreprocessConfig | None = None,
    ) -> None:
        """`preprocess`, `video`: the checkpoint's image- and video-processor settings."""
        self.cfg, self.tokenizer = cfg, tokenizer
        self.encoders, self.language = encoders, language
        self.metrics = metrics
        self.options = options or OrchestratorConfig()
        self.preprocess = preprocess
        self.video = video
        self.in_flight = 0
        self._releases: set[asyncio.Task[None]] = set()

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """One request's place among the in-flight ones; 429 when they are all taken."""
        if self.in_flight >= self.options.max_in_flight:
            self.metrics.rejected.labels("overloaded").inc()
            raise ApiError(
                429, f"{self.in_flight} requests in flight, the most this gateway takes "
                "(--max-in-flight-requests); retry later", retry_after=1.0,
            )  # fmt: skip
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()

    async def max_model_len(self) -> int | None:
        """The smallest max_model_len of the healthy replicas (what any request may use)."""
        lens = []
        for b in self.language.healthy:
            with contextlib.suppress(_Unreachable):
                lens.append((await self._info(b)).max_model_len)
        return min(lens, default=None)

    async def chat(self, req: ChatRequest) -> AsyncGenerator[Delta | Final, None]:
        started = time.monotonic()
        deadline = started + self.options.request_timeout_s
        prompt = await self._prompt(req)
        self._free_reasoning(req)
        tried: list[Backend] = []
        while True:
            backend = self.language.least_loaded(exclude=tried)
            if backend is None:
                seen = f" (tried {', '.join(b.address for b in tried)})" if tried else ""
                raise ApiError(503, f"no healthy language service{seen}", retry_after=1.0)
            backend.outstanding += 1  # from the choice on, so concurrent requests spread out
            try:
                async for item in self._on_replica(backend, req, prompt, deadline):
                    yield item
            except _Unreachable as e:  # raised before anything was yielded
                tried.append(backend)
                if e.mark_down:
                    self.language.mark_down(backend, e.reason)
                self.metrics.language_retries.labels(e.cause).inc()
                if len(tried) >= self.options.max_generate_attempts:
                    if e.cause == "busy":
                        raise ApiError(429, f"language service busy: {e.reason}",
                                       retry_after=1.0) from None  # fmt: skip
                    raise ApiError(503, f"language service: {e.reason}", retry_after=1.0) from None
                continue
            finally:
                backend.outstanding -= 1
            self.metrics.e2e.observe(time.monotonic() - started)
            return

    def _free_reasoning(self, req: ChatRequest) -> None:
        """With a reasoning parser, a reply that starts inside a think block (the prompt opens
        one) thinks freely: its constraint is enforced only after `</think>`, as vLLM does."""
        s = req.params.structured
        if self.options.reasoning_parser is None or s is None or s.after_token is not None:
            return
        if not reasoning_open(req.prompt_text, req.template_kwargs):
            return
        try:
            end = self.tokenizer.token_id(THINK_END)
        except ValueError:  # no single token closes the block: nothing to wait for
            return
        req.params = dataclasses.replace(
            req.params, structured=dataclasses.replace(s, after_token=end)
        )

    async def tokenize(self, req: ChatRequest) -> list[int]:
        """The prompt ids a request would be generated from (`/tokenize`)."""
        return (await self._prompt(req)).ids

    def detokenize(self, ids: list[int]) -> str:
        """`/detokenize`: the text of token ids, special tokens included (as vLLM's); 400
        outside the vocabulary."""
        try:
            check_token_ids(ids, self.cfg.text.vocab_size, "tokens")
        except ContractError as e:
            raise ApiError(400, str(e), e.param) from None
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def decode_prompt(self, ids: Sequence[int]) -> str:
        """A prompt's text for `echo` (special tokens kept, as the prompt had them)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    async def _prompt(self, req: ChatRequest) -> _Prompt:
        """Template, tokens and image placeholders; ApiError 400 for what cannot be. Sets
        `req.prompt_text` (what the reasoning parser reads)."""
        if req.prompt_ids is not None:  # /v1/completions with token ids: used as they are
            return _Prompt(list(req.prompt_ids), [])
        counts = [self._image_tokens(i, img) for i, img in enumerate(req.images)]
        plans, chunks = self._video_chunks(req)
        stamps = [p.timestamps for p in plans]
        merge = self.cfg.vision.spatial_merge_size if self.cfg.vision else 2
        try:
            if _text_chars(req.messages) > _TOKENIZE_INLINE_CHARS or len(req.prompt) > 4096:
                ids = await asyncio.to_thread(self._tokenize, req, stamps)
            else:
                ids = self._tokenize(req, stamps)
            if req.images or chunks:
                assert self.cfg.image_token_id is not None
                flat = [n for c in chunks for n in c.patch_counts(merge)]
                ids = expand_image_pads(ids, self.cfg.image_token_id, counts,
                                        self.cfg.video_token_id, flat)  # fmt: skip
        except (ValueError, UnicodeError) as e:
            raise ApiError(400, f"messages: {e}", "messages") from None
        return _Prompt(ids, counts, chunks)

    def _video_chunks(self, req: ChatRequest) -> tuple[list[VideoPlan], list[VideoChunk]]:
        """Every video planned from its header and cut into chunks; 400 for what cannot be (and
        for `mm_processor_kwargs` beyond the server's limits, videos or not)."""
        try:
            sampling = (
                self.video.sampling(req.video_fps, req.video_max_frames) if self.video else None
            )
        except ContractError as e:
            raise ApiError(400, str(e), e.param) from None
        if not req.videos:
            return [], []
        self.metrics.video_requests.inc()
        if sampling is None or self.video is None or self.cfg.video_token_id is None:
            raise ApiError(400, "this model takes no videos", "messages")
        try:
            return plan_chunks(req.videos, sampling, self.video, self.options.video_chunk_patches)
        except ContractError as e:
            raise ApiError(400, str(e), e.param) from None
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None

    def _tokenize(
        self, req: ChatRequest, video_stamps: Sequence[Sequence[float]] = ()
    ) -> list[int]:
        if req.prompt:  # /v1/completions: the text as it is, no template
            req.prompt_text = req.prompt
        else:
            tools = list(req.tools.tools) if req.tools is not None else None
            req.prompt_text = self.tokenizer.render(req.messages, req.add_generation_prompt,
                                                    tools, **req.template_kwargs)  # fmt: skip
            if video_stamps:
                req.prompt_text = expand_video_placeholders(req.prompt_text, video_stamps)
        return self.tokenizer.encode(req.prompt_text)

    def _image_tokens(self, index: int, image: Image) -> int:
        if self.cfg.vision is None or self.preprocess is None:
            raise ApiError(400, "this model takes no images", "messages")
        if self.encoders is None:
            raise ApiError(400, "this gateway has no encoders (--encoders): it takes no images",
                           "messages")  # fmt: skip
        try:
            grid = image_grid(image.width, image.height, self.preprocess)
        except ValueError as e:
            raise ApiError(400, f"image {index}: {e}", "messages") from None
        return image_token_count(grid, self.cfg.vision.spatial_merge_size)

    async def _on_replica(
        self, backend: Backend, req: ChatRequest, prompt: _Prompt, deadline: float
    ) -> AsyncGenerator[Delta | Final, None]:
        """The request on one language replica. Raises _Unreachable before its first item when
        the replica cannot take it; re-encodes the images when the replica could not pull one."""
        info = await self._info(backend)
        merge = self.cfg.vision.spatial_merge_size if self.cfg.vision else 2
        limits = PromptLimits(info.vocab_size, info.max_model_len, self.cfg.image_token_id, merge,
                              self.cfg.video_token_id)  # fmt: skip
        try:
            check_prompt(prompt.ids, prompt.counts, req.params, limits,
                         [c.patch_counts(merge) for c in prompt.chunks])  # fmt: skip
        except ContractError as e:
            raise ApiError(400, str(e), e.param) from None
        if req.params.structured is not None and (req.images or prompt.chunks):
            await self._compile_grammar(backend, req.params.structured)
        avoid: dict[int, set[str]] = {}  # image -> encoders that lost it in an earlier round
        media: list[Image | VideoChunk] = [*req.images, *prompt.chunks]
        for round_ in range(1, self.options.max_image_rounds + 1):
            images = await self._encode_all(media, info.host_id, avoid, deadline)
            timings = _encode_timings(images)
            try:
                wants = [*prompt.counts, *(c.tokens(merge) for c in prompt.chunks)]
                for i, (enc, want) in enumerate(zip(images, wants, strict=True)):
                    if enc.ref.n_tokens != want:
                        raise ApiError(502, f"image {i}: the encoder made {enc.ref.n_tokens} "
                                       f"tokens of it, the gateway expected {want} (do both "
                                       "read the same checkpoint?)")  # fmt: skip
                for enc, c in zip(images[len(req.images) :], prompt.chunks, strict=True):
                    assert isinstance(enc.ref, VideoRef)
                    if enc.ref.timestamps != c.timestamps:
                        raise ApiError(502, f"video {c.index}: the encoder's timestamps "
                                       f"{enc.ref.timestamps} differ from the gateway's "
                                       f"{c.timestamps}")  # fmt: skip
                refs = [e.ref for e in images if isinstance(e.ref, ImageRef)]
                vrefs = [e.ref for e in images if isinstance(e.ref, VideoRef)]
                request = generate_request(req.request_id, prompt.ids, refs, req.params, vrefs)
                async for item in self._generate(backend, request, req, timings, deadline):
                    yield item
                return
            except _ImageFault as f:
                self._release(images)
                fault = f.fault
                i = fault.image_index if fault.image_index is not None else 0
                self.metrics.image_retries.labels(fault.reason or "unknown").inc()
                log.warning("%s: image %d could not be pulled (%s, round %d): %s",
                            req.request_id, i, fault.reason, round_, fault.message)  # fmt: skip
                if fault.reason not in _IMAGE_RETRYABLE:
                    raise ApiError(502, f"language service: {fault.message}") from None
                if i < len(images) and fault.reason in ("producer_lost", "timeout"):
                    lost = images[i].backend
                    avoid.setdefault(i, set()).add(lost.address)
                    if fault.reason == "producer_lost" and self.encoders is not None:
                        self.encoders.mark_down(lost, f"lost image {i} of {req.request_id}")
                if time.monotonic() >= deadline:
                    raise ApiError(504, f"request deadline passed: {fault.message}") from None
            except BaseException:
                self._release(images)
                raise
        raise ApiError(502, f"images could not be delivered in {self.options.max_image_rounds} "
                       "rounds; see the gateway's log")  # fmt: skip

    async def _compile_grammar(self, backend: Backend, spec: StructuredOutput) -> None:
        """The replica compiles (and caches) the request's grammar: 400 when it cannot."""
        stub = language_pb2_grpc.LanguageStub(backend.channel)
        try:
            await stub.CompileGrammar(structured_to_proto(spec), timeout=_COMPILE_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            fault = fault_of(e)
            if fault is not None and fault.cause == Cause.REQUEST:
                raise ApiError(400, fault.message, "structured_outputs") from None
            _raise_retryable(backend, e, fault)
            raise _language_error(e, fault) from None

    async def _generate(
        self,
        backend: Backend,
        request: language_pb2.GenerateRequest,
        req: ChatRequest,
        timings: dict[str, float],
        deadline: float,
    ) -> AsyncIterator[Delta | Final]:
        stub = language_pb2_grpc.LanguageStub(backend.channel)
        n = req.params.n
        detoks = [IncrementalDetokenizer(self.tokenizer, req.stop) for _ in range(n)]
        completion = [0] * n
        done = [False] * n
        call = stub.Generate(request, timeout=max(0.001, deadline - time.monotonic()))
        first = True
        t0 = time.monotonic()
        try:
            async for msg in call:
                if msg.HasField("tokens"):
                    i = msg.tokens.index
                    if i >= n or done[i]:  # a sequence a stop string already ended
                        continue
                    ids = list(msg.tokens.token_ids)
                    completion[i] += len(ids)
                    if first:
                        self.metrics.ttft.observe(time.monotonic() - t0)
                        first = False
                    detok = detoks[i]
                    text = detok.add(ids)
                    delta = Delta(text, ids, _logprobs(self.tokenizer, ids, msg.tokens), i)
                    if msg.tokens.prompt_logprobs:
                        delta.prompt_logprobs = _prompt_logprobs(
                            self.tokenizer, request.prompt_token_ids, msg.tokens.prompt_logprobs
                        )
                    yield delta
                    if detok.stopped:  # a stop string ended it: free its KV cache downstream
                        done[i] = True
                        yield self._final("stop", request, completion[i], 0, timings, None, i)
                        if all(done):
                            call.cancel()
                            return
                        self._abort_sequence(stub, f"{request.request_id}#{i}")
                    continue
                f = msg.finished
                i = f.index
                if i >= n or done[i]:
                    continue
                done[i] = True
                rest = detoks[i].finish()
                if rest:
                    yield Delta(rest, [], index=i)
                reason = finish_from_proto(f.reason)
                if reason == FinishReason.ERROR:
                    raise ApiError(500, f"generation failed: {f.error}")
                yield self._final(str(reason), request, f.usage.completion_tokens,
                                  f.usage.cached_tokens, timings, f.timings, i)  # fmt: skip
                if all(done):
                    return
        except grpc.aio.AioRpcError as e:
            fault = fault_of(e)
            if first:
                _raise_retryable(backend, e, fault)
            elif fault is None and e.code() == grpc.StatusCode.UNAVAILABLE:
                self.language.mark_down(backend, e.details() or "connection lost")
            raise _language_error(e, fault) from None
        finally:
            if not call.done():
                call.cancel()

    def _abort_sequence(self, stub: language_pb2_grpc.LanguageStub, sequence_id: str) -> None:
        """Stop one sequence of a running request downstream (best effort, in the background)."""
        task = asyncio.create_task(_abort_one(stub, sequence_id))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    def _final(
        self,
        reason: str,
        request: language_pb2.GenerateRequest,
        completion: int,
        cached: int,
        timings: dict[str, float],
        lang: language_pb2.Timings | None,
        index: int = 0,
    ) -> Final:
        timings = dict(timings)
        if lang is not None:
            timings.update(
                transfer=lang.pull_seconds, prefill=lang.prefill_seconds, decode=lang.decode_seconds
            )
        return Final(reason, len(request.prompt_token_ids), completion, cached, timings, index)

    async def _info(self, backend: Backend) -> ReplicaInfo:
        if backend.info is None:
            stub = language_pb2_grpc.LanguageStub(backend.channel)
            try:
                reply = await stub.GetInfo(language_pb2.GetInfoRequest(), timeout=5.0)
            except grpc.aio.AioRpcError as e:
                reason = f"{backend.address}: {e.details() or e.code().name}"
                raise _Unreachable(reason, "unreachable") from None
            backend.info = replica_info_from_proto(reply)
            if backend.info.vocab_size != self.cfg.text.vocab_size:
                log.warning("language %s serves a vocabulary of %d tokens, the gateway's "
                            "checkpoint has %d: are they the same model?", backend.address,
                            backend.info.vocab_size, self.cfg.text.vocab_size)  # fmt: skip
        assert isinstance(backend.info, ReplicaInfo)
        return backend.info

    async def _encode_all(
        self,
        images: Sequence[Image | VideoChunk],
        consumer_host: str,
        avoid: dict[int, set[str]],
        deadline: float,
    ) -> list[_Encoded]:
        """Every image encoded, in parallel; on any failure, or if the request goes away
        meanwhile, the ones already published are released."""
        tasks = [asyncio.ensure_future(self._encode_one(i, img, consumer_host,
                                                        avoid.get(i, set()), deadline))
                 for i, img in enumerate(images)]  # fmt: skip
        if not tasks:
            return []
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:
            for t in tasks:
                t.cancel()
            self._release(_published(tasks))
            raise
        done = _published(tasks)
        for t in tasks:
            if (e := t.exception()) is not None:
                self._release(done)
                raise e
        return done

    async def _encode_one(
        self,
        index: int,
        image: Image | VideoChunk,
        consumer_host: str,
        avoid: set[str],
        deadline: float,
    ) -> _Encoded:
        assert self.encoders is not None
        tried: list[str] = []
        if isinstance(image, VideoChunk):
            request = image.encode_request(consumer_host)
            key, what = image.video.sha256, f"video {image.index}"
        else:
            request = encoder_pb2.EncodeRequest(
                images=[encoder_pb2.ImageData(data=image.data, content_hash=image.sha256)],
                consumer_host=consumer_host,
            )
            key, what = image.sha256, f"image {index}"
        # The encoder that owns this content hash first (its cache), then the least loaded;
        # encoders that lost this image in an earlier round go last.
        ranked = self.encoders.rank(key)
        if isinstance(image, VideoChunk):  # chunk k first on the k-th: a video fans out
            ranked = image.route(ranked)
        order = ranked[:1] + sorted(ranked[1:], key=lambda b: b.outstanding)
        order = [b for b in order if b.address not in avoid] + [
            b for b in order if b.address in avoid
        ]
        for backend in order[: self.options.max_encode_attempts]:
            stub = encoder_pb2_grpc.EncoderStub(backend.channel)
            backend.outstanding += 1
            t0 = time.monotonic()
            timeout = min(self.options.encode_timeout_s, deadline - t0)
            if timeout <= 0:
                raise ApiError(504, f"{what}: request deadline passed before encoding")
            try:
                reply = await stub.Encode(request, timeout=timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    detail = (e.details() or "").removeprefix("image 0: ").removeprefix("video 0: ")
                    raise ApiError(400, f"{what}: {detail}", "messages") from None
                if e.code() not in _RETRYABLE:
                    raise ApiError(502, f"encoder {backend.address}: {e.details()}") from None
                tried.append(f"{backend.address} ({e.code().name})")
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self.encoders.mark_down(backend, e.code().name)
                self.metrics.encoder_retries.labels(e.code().name).inc()
                continue
            finally:
                backend.outstanding -= 1
            seconds = time.monotonic() - t0
            if isinstance(image, VideoChunk):
                clip = reply.videos[0]
                self.metrics.video_tokens.inc(clip.n_tokens)
                return _Encoded(video_ref_from_encoded(clip), backend, seconds,
                                clip.preprocess_seconds, clip.encode_seconds)  # fmt: skip
            out = reply.images[0]
            self.metrics.images.labels("hit" if out.cache_hit else "miss").inc()
            return _Encoded(image_ref_from_encoded(out), backend, seconds,
                            out.preprocess_seconds, out.encode_seconds)  # fmt: skip
        detail = "; ".join(tried) if tried else "no healthy encoder"
        raise ApiError(503, f"{what}: could not be encoded: {detail}", retry_after=1.0)

    def _release(self, images: Sequence[_Encoded]) -> None:
        """Free handles that will not be pulled now, at their encoders (best effort, in the
        background; an already acknowledged or unknown id is no error)."""
        for e in images:
            task = asyncio.create_task(_release_one(e))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)


async def _abort_one(stub: language_pb2_grpc.LanguageStub, sequence_id: str) -> None:
    with contextlib.suppress(grpc.aio.AioRpcError):
        await stub.Abort(language_pb2.AbortRequest(request_id=sequence_id),
                         timeout=_RELEASE_TIMEOUT_S)  # fmt: skip


async def _release_one(e: _Encoded) -> None:
    stub = tensor_pb2_grpc.TensorStoreStub(e.backend.channel)
    with contextlib.suppress(grpc.aio.AioRpcError):
        await stub.ReleaseTensor(
            tensor_pb2.ReleaseTensorRequest(id=e.ref.handle.id), timeout=_RELEASE_TIMEOUT_S
        )


def _published(tasks: Sequence[asyncio.Future[_Encoded]]) -> list[_Encoded]:
    return [t.result() for t in tasks if t.done() and not t.cancelled() and not t.exception()]


def _encode_timings(images: Sequence[_Encoded]) -> dict[str, float]:
    """Images are encoded in parallel: the slowest one is the stage's cost."""
    slowest = max(images, key=lambda e: e.seconds, default=None)
    if slowest is None:
        return {"preprocess": 0.0, "encode": 0.0}
    return {"preprocess": slowest.preprocess_s, "encode": slowest.seconds - slowest.preprocess_s}


def _text_chars(messages: list[dict[str, Any]]) -> int:
    n = 0
    for m in messages:
        c = m.get("content") or ""
        n += len(c) if isinstance(c, str) else sum(len(p.get("text", "")) for p in c)
    return n


def _raise_retryable(backend: Backend, e: grpc.aio.AioRpcError, fault: Fault | None) -> None:
    """Before the first token: raise what lets `chat` or `_on_replica` try again, if anything."""
    code = e.code()
    if fault is None and code == grpc.StatusCode.UNAVAILABLE:  # the connection, not a servicer
        raise _Unreachable(f"{backend.address}: {e.details() or 'unavailable'}", "unreachable")
    if fault is None:
        return
    if fault.cause == Cause.IMAGE:
        raise _ImageFault(fault)
    if fault.cause == Cause.REPLICA and code == grpc.StatusCode.UNAVAILABLE:
        raise _Unreachable(f"{backend.address}: {fault.message}", "not_serving")
    if fault.cause == Cause.REPLICA and code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        raise _Unreachable(f"{backend.address}: {fault.message}", "busy", mark_down=False)


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


def _prompt_logprobs(
    tokenizer: ChatTokenizer, prompt_ids: Sequence[int], entries: Sequence[Any]
) -> list[dict[str, Any]]:
    """Entry j is prompt token j+1 given the tokens before it."""
    out = []
    for tid, lp in zip(list(prompt_ids)[1:], entries, strict=False):
        text = _token_text(tokenizer, tid)
        out.append({"token": text, "logprob": lp.logprob, "bytes": list(text.encode()),
                    "top_logprobs": [{"token": _token_text(tokenizer, t.token_id),
                                      "logprob": t.logprob,
                                      "bytes": list(_token_text(tokenizer, t.token_id).encode())}
                                     for t in lp.top]})  # fmt: skip
    return out


def _token_text(tokenizer: ChatTokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


class _Unreachable(Exception):
    """A language replica cannot take the request (before its first token): try another."""

    def __init__(self, reason: str, cause: str, mark_down: bool = True) -> None:
        super().__init__(reason)
        self.reason, self.cause, self.mark_down = reason, cause, mark_down


class _ImageFault(Exception):
    """The replica could not pull one of the request's images (before the first token)."""

    def __init__(self, fault: Fault) -> None:
        super().__init__(fault.message)
        self.fault = fault


def _language_error(e: grpc.aio.AioRpcError, fault: Fault | None) -> ApiError:
    code = e.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT and (fault is None or fault.cause == Cause.REQUEST):
        return ApiError(400, e.details() or "invalid request")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ApiError(429, e.details() or "language service busy", retry_after=1.0)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ApiError(504, e.details() or "generation timed out")
    return ApiError(503, f"language service: {e.details() or code.name}", retry_after=1.0)
