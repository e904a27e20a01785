"""The asyncio engine loop: schedule -> forward (on the torch thread) -> sample -> stream.

`generate()` admits one request and yields its tokens as they come. Its inputs are trusted: the
boundary in front of the engine (the language servicer, or the colocated pipeline that builds
them itself) has checked them against the shared contract (`common.contract`). The forward runs on
the process's one torch thread (`common.torch_thread`, where the weights were loaded), so the
event loop (gRPC, transfers) stays responsive and OpenMP keeps one team; all scheduler state is
touched only on the event loop, between steps. Aborts requested while a step runs take effect
right after it, so a request's blocks are never freed under a running forward.

Admission is bounded twice, and both bounds are checked by `reserve` before a caller pulls a
request's images: the waiting queue (`max_waiting`) and the bytes of image tensors the engine
holds for requests not yet finished (`max_image_bytes`).

A request of `n` sequences becomes n scheduler requests sharing one stream: the first has the
request's id, sequence i > 0 the id "<id>#<i>", its own generator (seeded from the request's
seed and i) and waits for the first's prompt to be computed, whose full blocks it then takes
from the prefix cache. A request with a structured-output constraint gets its compiled grammar
(compiled off the loop, cached by digest) and one matcher per sequence.

An `EngineFailed` forward (a tensor-parallel rank lost), or `fail` called when the runner's
watcher sees a worker exit, ends the engine for good: every request's stream raises
EngineFailed, new ones are refused, and `failed` is set for the service to exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import torch

from common.config import ModelConfig
from common.contract import ContractError, FinishReason, SamplingParams, image_pad_runs
from common.contract.sampling import MAX_SEED
from common.cores import CoreShare
from common.torch_thread import run_on_torch_thread, wait_torch_thread_idle
from services.language.engine.errors import EngineFailed
from services.language.engine.grammar import GrammarCompiler
from services.language.engine.kv_cache import BlockManager
from services.language.engine.model_runner import ModelRunner
from services.language.engine.request import ImageSpan, Request
from services.language.engine.sampler import Sample
from services.language.engine.scheduler import (
    QueueFull,
    ScheduledChunk,
    Scheduler,
    SchedulerConfig,
)
from services.language.inputs import image_identity
from services.language.metrics import LanguageMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ImageInput:
    """One image of a request, already pulled: its wire tensor, grid and identity."""

    tensor: torch.Tensor  # [n_tokens, (1 + D) * H]
    grid_thw: tuple[int, int, int]
    identity: bytes  # image_identity(tensor, grid): what the prefix cache keys it by

    @classmethod
    def of(cls, tensor: torch.Tensor, grid_thw: Sequence[int]) -> ImageInput:
        grid = (int(grid_thw[0]), int(grid_thw[1]), int(grid_thw[2]))
        return cls(tensor, grid, image_identity(tensor, grid))

    @classmethod
    def video_patches(cls, tensor: torch.Tensor, grid_thw: Sequence[int]) -> list[ImageInput]:
        """A video chunk's wire tensor `[t*h*w/m^2, (1 + D) * H]` as t items of grid (1, h, w),
        one per temporal patch: each is its own run of video-pad tokens, M-RoPE span and
        prefix-cache identity (row views, no copy)."""
        t, h, w = (int(g) for g in grid_thw)
        rows = tensor.shape[0] // t
        return [cls.of(tensor[i * rows : (i + 1) * rows], (1, h, w)) for i in range(t)]


def in_prompt_order(
    images: Sequence[ImageInput],
    image_spans: Sequence[tuple[int, int]],
    videos: Sequence[Sequence[ImageInput]],
    video_spans: Sequence[Sequence[tuple[int, int]]],
) -> tuple[list[ImageInput], list[tuple[int, int]]]:
    """Images and videos' temporal patches as one list ordered by where they sit in the prompt
    (what `Engine.generate` takes), with their spans."""
    items = list(zip(image_spans, images, strict=True))
    for patches, spans in zip(videos, video_spans, strict=True):
        items += zip(spans, patches, strict=True)
    items.sort(key=lambda item: item[0][0])
    return [i for _, i in items], [s for s, _ in items]


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """A new token, and on the last event the finish reason and usage."""

    sample: Sample | None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    prefill_s: float = 0.0  # on the last event: admission to first token (queueing included)
    decode_s: float = 0.0  # on the last event: first token to last
    index: int = 0  # the sequence, in [0, n)
    # On sequence 0's first token, when asked: (logprob, top) of prompt tokens 1.. in order.
    prompt_logprobs: tuple[tuple[float, tuple[tuple[int, float], ...]], ...] = ()


class Reservation:
    """A place in the waiting queue and `image_bytes` of the image budget, held from before a
    request's images are pulled until the request finishes (or `release`)."""

    def __init__(self, engine: Engine, image_bytes: int) -> None:
        self.engine, self.image_bytes = engine, image_bytes
        self.queued = True  # still counts as a waiting slot (until the scheduler has it)
        self.released = False

    def leave_queue(self) -> None:
        if self.queued:
            self.queued = False
            self.engine._reserved_slots -= 1

    def release(self) -> None:
        if not self.released:
            self.leave_queue()
            self.released = True
            self.engine._held_image_bytes -= self.image_bytes


class Engine:
    def __init__(
        self,
        cfg: ModelConfig,
        runner: ModelRunner,
        sched_cfg: SchedulerConfig,
        eos_token_ids: frozenset[int] = frozenset(),
        metrics: LanguageMetrics | None = None,
        max_model_len: int | None = None,
        max_image_bytes: int = 2 << 30,
        grammars: GrammarCompiler | None = None,
        cores: CoreShare | None = None,
    ) -> None:
        """`max_model_len`: tokens one sequence may hold (default: the checkpoint's context,
        capped by what the KV cache holds); `max_image_bytes`: image tensor bytes held at once;
        `grammars`: compiles structured-output constraints (None: requests with one fail);
        `cores`: the host's cores shared with other roles, claimed per step (`common.cores`)."""
        self.cfg, self.runner = cfg, runner
        self.max_model_len = max_model_len or min(
            cfg.text.max_position_embeddings, runner.capacity_tokens
        )
        if self.max_model_len > runner.capacity_tokens:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the KV cache ({runner.capacity_tokens}"
                " tokens)"
            )
        self.blocks = BlockManager(runner.num_blocks, runner.block_size, cfg.image_token_id)
        self.scheduler = Scheduler(sched_cfg, self.blocks)
        self.eos_token_ids = eos_token_ids
        self.metrics = metrics or LanguageMetrics()
        self.max_image_bytes = max_image_bytes
        self.grammars = grammars
        self.cores = cores
        self._reserved_slots = 0
        self._held_image_bytes = 0
        self._streams: dict[str, asyncio.Queue[TokenEvent]] = {}
        self._reservations: dict[str, Reservation] = {}  # by request id (its first sequence)
        self._families: dict[str, list[str]] = {}  # request id -> its live sequences' ids
        self._family_of: dict[str, str] = {}  # sequence id -> request id
        self._aborts: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count()
        self._seen = (0, 0)  # prefix-hit tokens and preemptions already counted in metrics
        self.failure: str | None = None  # why the engine can serve no more (see `fail`)
        self.failed = asyncio.Event()

    async def start(self) -> None:
        self._wake = asyncio.Event()  # bound to the loop that runs the engine
        self._task = asyncio.create_task(self._loop(), name="epd-engine-loop")
        loop = asyncio.get_running_loop()
        self.runner.watch(lambda reason: _call_soon(loop, self.fail, reason))

    def fail(self, reason: str) -> None:
        """The engine cannot run forwards any more: end every request (its stream raises
        EngineFailed), refuse new ones, set `failed`. On the event loop; idempotent."""
        if self.failure is not None:
            return
        self.failure = reason
        log.error("engine failed: %s", reason)
        for sequence_id in list(self._streams):
            self._end(sequence_id, FinishReason.ERROR)
        self.failed.set()
        self._wakeup()

    def close(self) -> None:
        """Release what the runner holds beyond this process (tensor-parallel workers); after
        `stop`, on the torch thread."""
        self.runner.close()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await wait_torch_thread_idle()  # no forward of ours is left in flight

    @property
    def idle(self) -> bool:
        return not self.scheduler.has_work

    @property
    def running_ids(self) -> set[str]:
        return set(self._streams)

    @property
    def held_image_bytes(self) -> int:
        return self._held_image_bytes

    def reserve(self, image_bytes: int = 0) -> Reservation:
        """Claim a waiting slot and `image_bytes` of the image budget before pulling a request's
        images; raises QueueFull (saying which bound) when there is no room. A request larger
        than the whole budget still runs, when nothing else holds image bytes. Raises
        EngineFailed once the engine failed."""
        if self.failure is not None:
            raise EngineFailed(self.failure)
        waiting = len(self.scheduler.waiting) + self._reserved_slots
        if waiting >= self.scheduler.cfg.max_waiting:
            raise QueueFull(f"{waiting} requests already waiting")
        if self._held_image_bytes and self._held_image_bytes + image_bytes > self.max_image_bytes:
            raise QueueFull(
                f"{self._held_image_bytes} bytes of image tensors already held "
                f"(--max-image-bytes-held {self.max_image_bytes})"
            )
        self._reserved_slots += 1
        self._held_image_bytes += image_bytes
        return Reservation(self, image_bytes)

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        images: Sequence[ImageInput] = (),
        request_id: str | None = None,
        reservation: Reservation | None = None,
        spans: Sequence[tuple[int, int]] | None = None,
    ) -> AsyncIterator[TokenEvent]:
        """`generate_batches`, one event at a time."""
        stream = self.generate_batches(prompt_ids, params, images, request_id, reservation, spans)
        async for batch in stream:
            for event in batch:
                yield event

    async def generate_batches(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        images: Sequence[ImageInput] = (),
        request_id: str | None = None,
        reservation: Reservation | None = None,
        spans: Sequence[tuple[int, int]] | None = None,
    ) -> AsyncIterator[list[TokenEvent]]:
        """Admit a request and stream its tokens, every event already there at once (a reader
        that fell behind gets the tokens of several steps together); closing the iterator
        aborts it.

        Trusted inputs: prompt ids in the vocabulary, prompt + max_tokens within max_model_len,
        `spans` the (start, length) of each image's pad run (from `image_pad_runs`; found here
        when not given). `params.max_tokens=None` takes all the room the context leaves."""
        if reservation is None:
            reservation = self.reserve(sum(i.tensor.nbytes for i in images))
        rid = request_id or f"req-{next(self._ids)}"
        try:
            if rid in self._streams or rid in self._families:
                raise ValueError(f"request id {rid!r} is already running")
            if params.max_tokens is None:
                params = dataclasses.replace(
                    params, max_tokens=self.max_model_len - len(prompt_ids)
                )
            if spans is None:
                counts = [i.tensor.shape[0] for i in images]
                spans = image_pad_runs(prompt_ids, self.cfg.image_token_id, counts)
            compiled = None
            if params.structured is not None:
                if self.grammars is None:
                    raise ContractError(
                        "this replica takes no structured outputs", "structured_outputs"
                    )
                compiled, _ = await self.grammars.compile(params.structured)
            first = Request(
                id=rid,
                prompt_ids=list(prompt_ids),
                params=params,
                images=[
                    ImageSpan(s, n, i.identity) for (s, n), i in zip(spans, images, strict=True)
                ],
                eos_token_ids=self.eos_token_ids,
                arrival=time.monotonic(),
            )
            await run_on_torch_thread(
                self.runner.prepare, first, [i.tensor for i in images], [i.grid_thw for i in images]
            )
            family = [first]
            for i in range(1, params.n):
                seed = sibling_seed(params.seed, i)
                # Only the first reports prompt logprobs: the others may take its blocks.
                own = dataclasses.replace(params, seed=seed, prompt_logprobs=None)
                sib = dataclasses.replace(first, id=f"{rid}#{i}", prompt_ids=list(prompt_ids),
                                          params=own,
                                          follows=first, index=i, output_ids=[],
                                          block_table=[], prompt_logprobs=[])  # fmt: skip
                self.runner.prepare_sibling(sib, first)
                family.append(sib)
            if compiled is not None:
                assert self.grammars is not None
                after = params.structured.after_token if params.structured else None
                for req in family:
                    req.constraint = self.grammars.constraint(compiled, after)
            for req in family:
                self.scheduler.add(req)
        except BaseException:
            reservation.release()
            raise
        reservation.leave_queue()
        self._reservations[rid] = reservation
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._families[rid] = [r.id for r in family]
        for req in family:
            self._streams[req.id] = queue
            self._family_of[req.id] = rid
        self._wakeup()
        left = params.n  # sequences not finished yet
        try:
            while left:
                batch = [await queue.get()]
                left -= batch[-1].finish_reason is not None
                while left and not queue.empty():
                    batch.append(queue.get_nowait())
                    left -= batch[-1].finish_reason is not None
                if self.failure is not None:
                    left = 0  # every sequence was ended
                    raise EngineFailed(self.failure)
                yield batch
        finally:
            if left:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        """Stop a request (every sequence), or one sequence "<id>#<i>" ("<id>#0" the first);
        blocks are freed before the next step."""
        one = request_id.removesuffix("#0")
        ids = self._families.get(request_id) or ([one] if one in self._streams else [])
        if ids:
            self._aborts.update(ids)
            self._wakeup()

    def _wakeup(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _loop(self) -> None:
        assert self._wake is not None
        while self.failure is None:
            self._apply_aborts()
            self._update_gauges()
            if not self.scheduler.has_work:
                self._wake.clear()
                await self._wake.wait()
                continue
            chunks = self.scheduler.schedule()
            if not chunks:
                await asyncio.sleep(0.001)
                continue
            try:
                samples = await run_on_torch_thread(self._step, chunks)
            except EngineFailed as e:
                self.fail(str(e))
                return
            except Exception:  # a failed forward must not take the service down
                log.exception("forward failed; ending the %d requests of this step", len(chunks))
                for c in chunks:
                    self._end(c.req.id, FinishReason.ERROR)
                continue
            if self.failure is not None:  # failed (a worker exited) while the step ran
                return
            tokens = {rid: s.token for rid, s in samples.items()}
            for req, _, reason in self.scheduler.postprocess(chunks, tokens):
                self._emit(req, samples[req.id], reason)

    def _step(self, chunks: list[ScheduledChunk]) -> dict[str, Sample]:
        """One forward, on the torch thread, with the cores it may use."""
        if self.cores is None:
            return self.runner.run(chunks)
        with self.cores.forward():
            return self.runner.run(chunks)

    def _emit(self, req: Request, sample: Sample, reason: FinishReason | None) -> None:
        now = time.monotonic()
        n = len(req.output_ids)
        self.metrics.generated_tokens.inc()
        prompt_logprobs: tuple = ()
        if n == 1:
            self.metrics.ttft.observe(now - req.arrival)
            if req.index == 0:
                self.metrics.prompt_tokens.inc(req.num_prompt)
                prompt_logprobs = tuple(req.prompt_logprobs)
            req.first_token_at = now
        usage = None
        if reason is not None:
            if n > 1 and req.first_token_at is not None:
                self.metrics.tpot.observe((now - req.first_token_at) / (n - 1))
            self.metrics.finished.labels(reason.value).inc()
            usage = Usage(req.num_prompt, n, req.num_cached_prompt)
            self._release(req.id)
        queue = self._streams.get(req.id)
        if queue is not None:
            first = req.first_token_at if req.first_token_at is not None else now
            timings = (first - req.arrival, now - first) if reason is not None else (0.0, 0.0)
            queue.put_nowait(TokenEvent(sample, reason, usage, *timings, req.index,
                                        prompt_logprobs))  # fmt: skip
            if reason is not None:
                del self._streams[req.id]

    def _end(self, request_id: str, reason: FinishReason) -> None:
        req = self.scheduler.abort(request_id)
        self._release(request_id)
        queue = self._streams.pop(request_id, None)
        if queue is not None:
            n = len(req.output_ids) if req else 0
            usage = Usage(req.num_prompt, n, req.num_cached_prompt) if req else None
            index = req.index if req else _index_of(request_id)
            queue.put_nowait(TokenEvent(None, reason, usage, index=index))
        self.metrics.finished.labels(reason.value).inc()

    def _release(self, sequence_id: str) -> None:
        """One sequence is done; the request's reservation goes with its last sequence."""
        rid = self._family_of.pop(sequence_id, sequence_id)
        live = self._families.get(rid)
        if live is not None and sequence_id in live:
            live.remove(sequence_id)
        if live:
            return
        self._families.pop(rid, None)
        reservation = self._reservations.pop(rid, None)
        if reservation is not None:
            reservation.release()

    def _apply_aborts(self) -> None:
        while self._aborts:
            self._end(self._aborts.pop(), FinishReason.ABORT)

    def _update_gauges(self) -> None:
        m = self.metrics
        m.running.set(len(self.scheduler.running))
        m.waiting.set(len(self.scheduler.waiting))
        m.kv_usage.set(self.blocks.num_used / len(self.blocks.blocks))
        hits, preemptions = self.blocks.hit_tokens_total, self.scheduler.num_preemptions
        m.prefix_hit_tokens.inc(hits - self._seen[0])
        m.preemptions.inc(preemptions - self._seen[1])
        self._seen = (hits, preemptions)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[str], None], arg: str) -> None:
    """`fn(arg)` on `loop`, from another thread."""
    loop.call_soon_threadsafe(fn, arg)


def sibling_seed(seed: int | None, index: int) -> int | None:
    """Sequence `index`'s seed: the request's own for the first, a digest of (seed, index) for
    the others (distinct streams, and not the streams of requests seeded seed + 1, ...)."""
    if seed is None or index == 0:
        return seed
    d = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") & MAX_SEED


def _index_of(sequence_id: str) -> int:
    head, _, tail = sequence_id.rpartition("#")
    return int(tail) if head and tail.isdigit() else 0
