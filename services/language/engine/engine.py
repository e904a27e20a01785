"""The asyncio engine loop: schedule -> forward (on the torch thread) -> sample -> stream.

`generate()` validates and admits one request and yields its tokens as they come. The forward
runs on the process's one torch thread (`common.torch_thread`, where the weights were loaded),
so the event loop (gRPC, transfers) stays responsive and OpenMP keeps one team; all
scheduler state is touched only on the event loop, between steps. Aborts requested while a step
runs take effect right after it, so a request's blocks are never freed under a running forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from common.config import ModelConfig
from common.torch_thread import run_on_torch_thread, wait_torch_thread_idle
from services.language.engine.kv_cache import BlockManager
from services.language.engine.model_runner import ModelRunner
from services.language.engine.request import ImageSpan, Request, SamplingParams
from services.language.engine.sampler import Sample
from services.language.engine.scheduler import Scheduler, SchedulerConfig
from services.language.metrics import LanguageMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ImageInput:
    """One image of a request, already pulled: its wire tensor, grid and content hash."""

    tensor: torch.Tensor  # [n_tokens, (1 + D) * H]
    grid_thw: tuple[int, int, int]
    content_hash: str


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """A new token, and on the last event the finish reason and usage."""

    sample: Sample | None
    finish_reason: str | None = None
    usage: Usage | None = None
    prefill_s: float = 0.0  # on the last event: admission to first token (queueing included)
    decode_s: float = 0.0  # on the last event: first token to last


class Engine:
    def __init__(
        self,
        cfg: ModelConfig,
        runner: ModelRunner,
        sched_cfg: SchedulerConfig,
        eos_token_ids: frozenset[int] = frozenset(),
        metrics: LanguageMetrics | None = None,
    ) -> None:
        self.cfg, self.runner = cfg, runner
        self.blocks = BlockManager(runner.num_blocks, runner.block_size, cfg.image_token_id)
        self.scheduler = Scheduler(sched_cfg, self.blocks)
        self.eos_token_ids = eos_token_ids
        self.metrics = metrics or LanguageMetrics()
        self._streams: dict[str, asyncio.Queue[TokenEvent]] = {}
        self._aborts: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count()
        self._seen = (0, 0)  # prefix-hit tokens and preemptions already counted in metrics

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="epd-engine-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await wait_torch_thread_idle()  # no forward of ours is left in flight

    @property
    def idle(self) -> bool:
        return not self.scheduler.has_work

    @property
    def running_ids(self) -> set[str]:
        return set(self._streams)

    def validate(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise ValueError("prompt_ids: the prompt is empty")
        limit = self.cfg.text.max_position_embeddings
        if len(prompt_ids) >= limit:
            raise ValueError(f"prompt_ids: {len(prompt_ids)} tokens exceed the context ({limit})")
        vocab = self.cfg.text.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"prompt_ids: token id {bad[0]} is outside the vocabulary [0, {vocab})"
            )

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        images: list[ImageInput] | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[TokenEvent]:
        """Admit a request and stream its tokens. Raises ValueError for bad input and
        `scheduler.QueueFull` when too many requests wait. Closing the iterator aborts it."""
        self.validate(prompt_ids)
        images = images or []
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already running")
        req = Request(
            id=rid,
            prompt_ids=list(prompt_ids),
            params=params,
            images=self._spans(prompt_ids, images),
            eos_token_ids=self.eos_token_ids,
            arrival=time.monotonic(),
        )
        await run_on_torch_thread(
            self.runner.prepare, req, [i.tensor for i in images], [i.grid_thw for i in images]
        )
        self.scheduler.add(req)
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._streams[rid] = queue
        self._wake.set()
        finished = False
        try:
            while True:
                event = await queue.get()
                yield event
                if event.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks are freed before the next step."""
        if request_id in self._streams:
            self._aborts.add(request_id)
            self._wake.set()

    def _spans(self, prompt_ids: list[int], images: list[ImageInput]) -> list[ImageSpan]:
        """Image spans in prompt order; counts are checked against the tensors in `prepare`."""
        spans: list[ImageSpan] = []
        pos = 0
        token = self.cfg.image_token_id
        for img in images:
            while pos < len(prompt_ids) and prompt_ids[pos] != token:
                pos += 1
            n = img.tensor.shape[0]
            if pos + n > len(prompt_ids) or any(t != token for t in prompt_ids[pos : pos + n]):
                raise ValueError(
                    f"images: image {len(spans)} has {n} rows but the prompt has no run of "
                    f"{n} image-pad tokens for it"
                )
            spans.append(ImageSpan(pos, n, img.content_hash))
            pos += n
        if token is not None and token in prompt_ids[pos:]:
            raise ValueError("images: the prompt has more image-pad tokens than the images fill")
        return spans

    async def _loop(self) -> None:
        while True:
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
                samples = await run_on_torch_thread(self.runner.run, chunks)
            except Exception:  # a failed forward must not take the service down
                log.exception("forward failed; ending the %d requests of this step", len(chunks))
                for c in chunks:
                    self._end(c.req.id, "error")
                continue
            tokens = {rid: s.token for rid, s in samples.items()}
            for req, _, reason in self.scheduler.postprocess(chunks, tokens):
                self._emit(req, samples[req.id], reason)

    def _emit(self, req: Request, sample: Sample, reason: str | None) -> None:
        now = time.monotonic()
        n = len(req.output_ids)
        self.metrics.generated_tokens.inc()
        if n == 1:
            self.metrics.ttft.observe(now - req.arrival)
            self.metrics.prompt_tokens.inc(req.num_prompt)
            req.first_token_at = now
        usage = None
        if reason is not None:
            if n > 1 and req.first_token_at is not None:
                self.metrics.tpot.observe((now - req.first_token_at) / (n - 1))
            self.metrics.finished.labels(reason).inc()
            usage = Usage(req.num_prompt, n, req.num_cached_prompt)
        queue = self._streams.get(req.id)
        if queue is not None:
            first = req.first_token_at if req.first_token_at is not None else now
            timings = (first - req.arrival, now - first) if reason is not None else (0.0, 0.0)
            queue.put_nowait(TokenEvent(sample, reason, usage, *timings))
            if reason is not None:
                del self._streams[req.id]

    def _end(self, request_id: str, reason: str) -> None:
        req = self.scheduler.abort(request_id)
        queue = self._streams.pop(request_id, None)
        if queue is not None:
            n = len(req.output_ids) if req else 0
            usage = Usage(req.num_prompt, n, req.num_cached_prompt) if req else None
            queue.put_nowait(TokenEvent(None, reason, usage))
        self.metrics.finished.labels(reason).inc()

    def _apply_aborts(self) -> None:
        while self._aborts:
            self._end(self._aborts.pop(), "abort")

    def _update_gauges(self) -> None:
        m = self.metrics
        m.running.set(len(self.scheduler.running))
        m.waiting.set(len(self.scheduler.waiting))
        m.kv_usage.set(self.blocks.num_used / len(self.blocks.blocks))
        hits, preemptions = self.blocks.hit_tokens_total, self.scheduler.num_preemptions
        m.prefix_hit_tokens.inc(hits - self._seen[0])
        m.preemptions.inc(preemptions - self._seen[1])
        self._seen = (hits, preemptions)
