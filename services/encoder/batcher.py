"""Dynamic batching: preprocessed images of all requests -> vision tower forwards on one thread.

The batcher task takes queued images oldest first into one forward, bounded by
`max_batch_patches` and `max_batch_images`. While the tower is idle it waits at most
`max_wait_s` after the oldest image arrived for others to join; while a forward runs, arrivals
simply queue for the next one. Work whose requests all left (cancelled, deadline passed) is
dropped before the forward.

Every torch call runs on the process's one torch thread (`common.torch_thread`, where the
weights were loaded too): torch ops issued from several threads make their OpenMP teams fight,
and the event loop must never block on a forward. Results are handed back through
`settle(pending, entry, exc)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from common.cores import CoreShare
from common.torch_thread import run_on_torch_thread, wait_torch_thread_idle
from services.encoder.cache import CachedImage, Grid, Pending
from services.encoder.metrics import EncoderMetrics
from services.encoder.model import VisionTower
from services.encoder.preprocess import ProcessedImage
from services.encoder.video import ProcessedVideo

log = logging.getLogger(__name__)

T = TypeVar("T")
Settle = Callable[[Pending, CachedImage | None, BaseException | None], None]


class Dropped(TimeoutError):
    """Queued work abandoned before the forward: its requests were cancelled or expired."""


class ForwardError(RuntimeError):
    """The vision tower failed on an image that preprocessed fine (a server-side fault)."""


@dataclass(eq=False)
class _Work:
    pending: Pending
    image: ProcessedImage | ProcessedVideo  # a video (chunk) batches like an image of t frames
    enqueued: float  # event-loop time

    @property
    def patches(self) -> int:
        return int(self.image.pixel_values.shape[0])


class Batcher:
    def __init__(
        self,
        tower: VisionTower,
        device: torch.device,
        settle: Settle,
        metrics: EncoderMetrics,
        max_batch_patches: int,
        max_batch_images: int,
        max_wait_s: float,
        cores: CoreShare | None = None,
    ) -> None:
        """`cores`: the host's cores shared with other roles (`common.cores`), claimed per
        forward; None = the process's own thread count."""
        self.tower, self.device, self._settle, self.metrics = tower, device, settle, metrics
        self.cores = cores
        self.max_batch_patches, self.max_batch_images = max_batch_patches, max_batch_images
        self.max_wait_s = max_wait_s
        self.forwards = 0  # tower forwards run for requests (warm-up not counted)
        self._queue: deque[_Work] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="epd-encoder-batcher")

    async def stop(self) -> None:
        """Stop the loop (queued work is left to the caller)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await wait_torch_thread_idle()  # no forward of ours is left in flight

    def submit(self, pending: Pending, image: ProcessedImage | ProcessedVideo) -> None:
        self._queue.append(_Work(pending, image, asyncio.get_running_loop().time()))
        self._wakeup.set()

    async def on_torch_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await run_on_torch_thread(fn, *args)

    def forward(self, pixels: list[torch.Tensor], grids: list[Grid]) -> list[torch.Tensor]:
        """On the torch thread only. One CPU copy per image: `[n_tokens, (1+D)*H]`."""
        with (
            self.cores.forward() if self.cores else contextlib.nullcontext(),
            torch.inference_mode(),
        ):
            x = torch.cat(pixels).to(self.device)  # [sum(t*h*w), C*T*P*P]
            outs = self.tower(x, grids)
            # Own copies: a cached entry must not keep the whole batch's output alive.
            return [o.to("cpu", copy=True) for o in outs]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # The tower is idle: give other requests up to max_wait_s to join this forward.
            oldest = self._queue[0].enqueued
            while not self._full():
                remaining = oldest + self.max_wait_s - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
            batch = self._take(loop.time())
            if batch:
                await self._run(batch)

    def _full(self) -> bool:
        if len(self._queue) >= self.max_batch_images:
            return True
        return sum(w.patches for w in self._queue) >= self.max_batch_patches

    def _take(self, now: float) -> list[_Work]:
        """Oldest first, within the bounds (an oversized image goes alone); drops abandoned."""
        batch: list[_Work] = []
        patches = 0
        while self._queue:
            work = self._queue.popleft()
            if work.pending.abandoned(now):
                self._settle(work.pending, None, Dropped("request cancelled or deadline passed"))
                continue
            if batch and (
                len(batch) >= self.max_batch_images
                or patches + work.patches > self.max_batch_patches
            ):
                self._queue.appendleft(work)
                break
            batch.append(work)
            patches += work.patches
        return batch

    async def _run(self, batch: list[_Work]) -> None:
        pixels = [w.image.pixel_values for w in batch]
        grids = [w.image.grid_thw for w in batch]
        started = time.perf_counter()
        try:
            outs = await self.on_torch_thread(self.forward, pixels, grids)
        except Exception as e:
            log.exception("vision tower forward failed on a batch of %d images", len(batch))
            if len(batch) > 1:  # retry one by one, so only a culprit image fails
                for work in batch:
                    await self._run([work])
                return
            self._settle(batch[0].pending, None, ForwardError(f"vision tower failed: {e}"))
            return
        self.forwards += 1
        self.metrics.encode_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_images.observe(len(batch))
        self.metrics.batch_patches.observe(sum(w.patches for w in batch))
        done = time.perf_counter()
        for work, out in zip(batch, outs, strict=True):
            p = work.pending
            chunk = work.image.chunk if isinstance(work.image, ProcessedVideo) else None
            entry = CachedImage(out, work.image.grid_thw, p.preprocess_s, done - p.queued_at, chunk)
            self._settle(p, entry, None)
