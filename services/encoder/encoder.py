"""The encoder: image and video bytes -> published wire tensors, with dynamic batching and an
output cache.

One call (`Encoder.encode`, or `encode_videos` for videos and chunks of them) walks each item
through the same steps (a video's key adds its sampling and the temporal patches asked for; its
preprocessing decodes only their frames):

1. hash: SHA-256 of the bytes + a digest of the preprocessing settings = the cache key;
2. cache: a hit is republished without running the tower; an identical image already in flight
   (`Pending`) is joined, so concurrent requests for one image run the tower once;
3. preprocess (decode, resize, patchify) on a small thread pool, off the event loop; a bad image
   fails only its own request, before it can join a batch;
4. batch (batcher.py): queued images of all requests go into one forward, bounded in patches
   and images, on ONE dedicated torch thread; work whose requests all left (cancelled, deadline
   passed) is dropped before the forward;
5. the forward's per-image outputs (CPU copies) enter the cache and wake every waiter;
6. publish each image's tensor into the transfer pool (never blocks: a full pool fails at once)
   and return the handles. All or nothing: if any image fails, the handles already published for
   that call are released.

No gRPC here: the servicer maps the exceptions below to status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from common.contract import (
    ImageLimits,
    PreprocessConfig,
    VideoLimits,
    VideoPreprocessConfig,
    VideoSampling,
    image_token_count,
)
from common.cores import CoreShare
from common.rpc import tensor_pb2
from common.transfer import PoolExhaustedError, Producer
from services.encoder.batcher import Batcher, Dropped
from services.encoder.cache import CachedImage, Grid, Pending, TensorCache
from services.encoder.metrics import EncoderMetrics
from services.encoder.model import VisionTower
from services.encoder.preprocess import ProcessedImage, preprocess
from services.encoder.video import ProcessedVideo, VideoChunk, preprocess_video

log = logging.getLogger(__name__)

MIB = 1 << 20
_HASH_INLINE_BYTES = 256 * 1024  # hash larger images off the event loop


@dataclass(frozen=True)
class EncoderConfig:
    # Patches (rows of pixel_values, t*h*w per image) per forward at most. An image larger than
    # this still runs, alone.
    max_batch_patches: int = 16384
    # Images per forward at most; 1 turns batching off.
    max_batch_images: int = 64
    # While the tower is idle, how long the oldest queued image waits for others, in seconds.
    max_wait_s: float = 0.005
    # Images accepted and not yet answered, beyond which calls get EncoderBusy.
    max_queue_images: int = 256
    # What one Encode call may carry (the gateway checks the same limits first).
    limits: ImageLimits = field(default_factory=ImageLimits)
    video_limits: VideoLimits = field(default_factory=VideoLimits)
    # Bytes of wire tensors the output cache keeps (CPU memory); 0 = no cache.
    cache_bytes: int = 256 * MIB
    preprocess_threads: int = 2

    def __post_init__(self) -> None:
        positive = ("max_batch_patches", "max_batch_images", "max_queue_images",
                    "preprocess_threads")  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_wait_s < 0 or self.cache_bytes < 0:
            raise ValueError("max_wait_s and cache_bytes must be >= 0")
        if self.limits.max_images_per_request > self.max_queue_images:
            raise ValueError("max_images_per_request cannot exceed max_queue_images")


class ImageError(ValueError):
    """One image of a request is unusable; the message names its index and the reason."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"image {index}: {reason}")
        self.index = index


class VideoError(ValueError):
    """One video of a request is unusable; the message names its index and the reason."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"video {index}: {reason}")
        self.index = index


@dataclass(frozen=True, slots=True)
class VideoJob:
    """One video, or the run of its temporal patches first..first+count-1 (count 0: to the end),
    sampled as `sampling` says."""

    data: bytes
    sampling: VideoSampling
    first: int = 0
    count: int = 0

    @property
    def key(self) -> str:
        return f"{self.sampling.cache_key}/{self.first}:{self.count}"


class EncoderBusy(Exception):
    """The queue bound is reached; the caller should retry later or elsewhere."""


@dataclass(frozen=True, slots=True)
class EncodedImage:
    handle: tensor_pb2.TensorHandle
    grid_thw: Grid  # in patches, before the merge
    n_tokens: int
    image_hash: str  # hex SHA-256 of the bytes
    cache_hit: bool
    preprocess_s: float = 0.0  # 0 for a cache hit
    forward_s: float = 0.0  # batching wait + tower forward; 0 for a cache hit


@dataclass(frozen=True, slots=True)
class EncodedVideo:
    handle: tensor_pb2.TensorHandle
    grid_thw: Grid  # (temporal patches encoded, h, w)
    n_tokens: int
    video_hash: str  # hex SHA-256 of the file
    cache_hit: bool
    chunk: VideoChunk  # timestamps, first patch, total patches, frames decoded
    preprocess_s: float = 0.0
    forward_s: float = 0.0


class Encoder:
    def __init__(
        self,
        tower: VisionTower,
        preprocess_cfg: PreprocessConfig,
        producer: Producer,
        cfg: EncoderConfig | None = None,
        metrics: EncoderMetrics | None = None,
        device: torch.device | str = "cpu",
        video_cfg: VideoPreprocessConfig | None = None,
        cores: CoreShare | None = None,
    ) -> None:
        """`video_cfg`: the checkpoint's video-processor settings (default: transformers')."""
        self.tower, self.preprocess_cfg, self.producer = tower, preprocess_cfg, producer
        self.video_cfg = video_cfg or VideoPreprocessConfig()
        self.cfg = cfg or EncoderConfig()
        self.metrics = metrics or EncoderMetrics()
        self.device = torch.device(device)
        self.cache = TensorCache(self.cfg.cache_bytes)
        self._settings = hashlib.sha256(preprocess_cfg.cache_key.encode()).hexdigest()[:16]
        self._video_settings = hashlib.sha256(self.video_cfg.cache_key.encode()).hexdigest()[:16]
        self._pending: dict[str, Pending] = {}
        self._admitted = 0
        self._tasks: set[asyncio.Task[None]] = set()
        c = self.cfg
        self.batcher = Batcher(tower, self.device, self._settle, self.metrics,
                               c.max_batch_patches, c.max_batch_images, c.max_wait_s,
                               cores)  # fmt: skip
        self._preprocess = ThreadPoolExecutor(
            self.cfg.preprocess_threads, thread_name_prefix="epd-encoder-preprocess"
        )
        # Publishing is a memcpy (numpy, no torch threads); its own thread keeps replies from
        # queueing behind a backlog of preprocessing.
        self._publisher = ThreadPoolExecutor(1, thread_name_prefix="epd-encoder-publish")
        self.metrics.pool_bytes_in_use.set_function(lambda: producer.bytes_in_use)
        self.metrics.cache_bytes.set_function(lambda: self.cache.bytes)

    async def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        """Stop batching; work still queued fails. Call after the server has drained."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.batcher.stop()
        for pending in list(self._pending.values()):
            self._settle(pending, exc=EncoderBusy("the encoder is shutting down"))
        for pool in (self._preprocess, self._publisher):
            await asyncio.to_thread(pool.shutdown)

    async def warm_up(self) -> None:
        """One forward of the smallest image on the torch thread, then a publish and release."""
        c, m = self.tower.cfg, self.tower.cfg.spatial_merge_size
        width = c.in_channels * c.temporal_patch_size * c.patch_size**2
        loop = asyncio.get_running_loop()
        started = loop.time()
        pixels = torch.zeros(m * m, width)  # one merged token: grid (1, m, m)
        (out,) = await self.batcher.on_torch_thread(self.batcher.forward, [pixels], [(1, m, m)])
        handle = await loop.run_in_executor(self._publisher, self.producer.publish, out)
        self.producer.release(handle.id)
        log.info("warm-up done in %.2f s", loop.time() - started)

    async def encode(
        self,
        images: Sequence[bytes],
        consumer_host: str | None = None,
        deadline: float | None = None,
    ) -> list[EncodedImage]:
        """Encode and publish every image, in order. `deadline` is event-loop time.

        Raises ValueError / ImageError (bad request or image), EncoderBusy (queue full),
        PoolExhaustedError (pool full), TimeoutError (deadline), ForwardError.
        """
        started = time.perf_counter()
        self._check_request(images)
        entries, handles = await self._run_call(images, None, consumer_host, deadline)
        self.metrics.request_seconds.observe(time.perf_counter() - started)
        merge = self.tower.cfg.spatial_merge_size
        return [
            EncodedImage(h, e.grid_thw, image_token_count(e.grid_thw, merge),
                         digest, hit, 0.0 if hit else e.preprocess_s, 0.0 if hit else e.forward_s)
            for h, (e, digest, hit) in zip(handles, entries, strict=True)
        ]  # fmt: skip

    async def encode_videos(
        self,
        videos: Sequence[VideoJob],
        consumer_host: str | None = None,
        deadline: float | None = None,
    ) -> list[EncodedVideo]:
        """`encode` for videos (or chunks of them): one wire tensor per job, in order. Raises
        ValueError / VideoError (bad request or video), and what `encode` raises."""
        started = time.perf_counter()
        self._check_videos(videos)
        entries, handles = await self._run_call(
            [v.data for v in videos], videos, consumer_host, deadline
        )
        self.metrics.request_seconds.observe(time.perf_counter() - started)
        merge = self.tower.cfg.spatial_merge_size
        out = []
        for h, (e, digest, hit) in zip(handles, entries, strict=True):
            assert e.chunk is not None
            n = image_token_count(e.grid_thw, merge)
            self.metrics.video_tokens.inc(n)
            out.append(
                EncodedVideo(
                    h,
                    e.grid_thw,
                    n,
                    digest,
                    hit,
                    e.chunk,
                    0.0 if hit else e.preprocess_s,
                    0.0 if hit else e.forward_s,
                )
            )
        return out

    async def _run_call(
        self,
        items: Sequence[bytes],
        jobs: Sequence[VideoJob] | None,
        consumer_host: str | None,
        deadline: float | None,
    ) -> tuple[list[tuple[CachedImage, str, bool]], list[tensor_pb2.TensorHandle]]:
        """Admission against the queue bound, then every item's entry and its published handle."""
        n = len(items)
        if self._admitted + n > self.cfg.max_queue_images:
            self.metrics.rejected.labels("queue_full").inc(n)
            raise EncoderBusy(
                f"encoder queue is full: {self._admitted} items waiting, limit "
                f"{self.cfg.max_queue_images}"
            )
        self._admitted += n
        self.metrics.queue_depth.set(self._admitted)
        try:
            async with asyncio.timeout_at(deadline):
                entries = await self._entries(items, deadline, jobs)
                handles = await self._publish([e for e, _, _ in entries], consumer_host)
        finally:
            self._admitted -= n
            self.metrics.queue_depth.set(self._admitted)
        return entries, handles

    def _check_videos(self, videos: Sequence[VideoJob]) -> None:
        limits = self.cfg.video_limits
        if not videos:
            raise ValueError("the request has no videos")
        if len(videos) > limits.max_videos_per_request:
            raise ValueError(
                f"the request has {len(videos)} videos, more than the limit "
                f"{limits.max_videos_per_request}"
            )
        for i, job in enumerate(videos):
            if len(job.data) > limits.max_video_bytes:
                self.metrics.rejected.labels("too_large").inc()
                raise VideoError(
                    i,
                    f"{len(job.data)} bytes, over the limit "
                    f"{limits.max_video_bytes} (--max-video-bytes)",
                )

    def _check_request(self, images: Sequence[bytes]) -> None:
        limits = self.cfg.limits
        if not images:
            raise ValueError("the request has no images")
        if len(images) > limits.max_images_per_request:
            raise ValueError(
                f"the request has {len(images)} images, more than the limit "
                f"{limits.max_images_per_request}"
            )
        for i, data in enumerate(images):
            if len(data) > limits.max_image_bytes:
                self.metrics.rejected.labels("too_large").inc()
                raise ImageError(i, f"{len(data)} bytes, over the limit {limits.max_image_bytes}")

    async def _entries(
        self, images: Sequence[bytes], deadline: float | None, jobs: Sequence[VideoJob] | None
    ) -> list[tuple[CachedImage, str, bool]]:
        """All items concurrently; the first failure cancels the rest (their queued work is
        dropped unless another request waits for it) and is raised."""
        tasks = [
            asyncio.ensure_future(self._one(i, d, deadline, jobs[i] if jobs else None))
            for i, d in enumerate(images)
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()  # no-op for finished ones
        failures = [t.exception() for t in tasks if t.done() and not t.cancelled()]
        for exc in failures:  # lowest failing image index first
            if exc is not None:
                raise exc
        return [t.result() for t in tasks]

    async def _one(
        self, index: int, data: bytes, deadline: float | None, job: VideoJob | None = None
    ) -> tuple[CachedImage, str, bool]:
        """(cache entry, content hash, cache hit) for one image (or video job) of a request."""
        loop = asyncio.get_running_loop()
        if len(data) > _HASH_INLINE_BYTES:
            digest = await loop.run_in_executor(self._preprocess, _sha256, data)
        else:
            digest = _sha256(data)
        key = f"{digest}/{self._settings}"
        if job is not None:  # the same file sampled or cut otherwise is another entry
            key = f"{digest}/v{self._video_settings}/{job.key}"
        entry = self.cache.get(key)
        if entry is not None:
            self.metrics.cache_hits.inc()
            return entry, digest, True
        pending = self._pending.get(key)
        hit = pending is not None
        if pending is None:
            pending = Pending(key, loop.create_future())
            self._pending[key] = pending
            task = asyncio.create_task(self._produce(pending, data, job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        (self.metrics.cache_hits if hit else self.metrics.cache_misses).inc()
        pending.join(deadline)
        try:
            entry = await asyncio.shield(pending.future)
        except ValueError as e:
            self.metrics.rejected.labels("bad_image" if job is None else "bad_video").inc()
            raise (ImageError if job is None else VideoError)(index, str(e)) from None
        finally:
            pending.waiters -= 1
        return entry, digest, hit

    async def _produce(self, pending: Pending, data: bytes, job: VideoJob | None) -> None:
        """Preprocess one image (or decode and preprocess a video job) and queue it for the
        batcher (which settles `pending`)."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            image: ProcessedImage | ProcessedVideo
            if job is None:
                image = await loop.run_in_executor(
                    self._preprocess, preprocess, data, self.preprocess_cfg
                )
            else:
                video = await loop.run_in_executor(
                    self._preprocess, preprocess_video, data, job.sampling, self.video_cfg,
                    job.first, job.count, self.cfg.video_limits,
                )  # fmt: skip
                self.metrics.video_frames_decoded.inc(video.chunk.frames_decoded)
                self.metrics.video_decode_seconds.observe(video.chunk.decode_s)
                image = video
        except ValueError as e:
            self._settle(pending, exc=e)
            return
        except Exception as e:  # a file that crashes the preprocessor is a bad file
            log.warning("preprocess failed unexpectedly", exc_info=True)
            what = "image" if job is None else "video"
            self._settle(pending, exc=ValueError(f"cannot preprocess {what}: {type(e).__name__}"))
            return
        if pending.abandoned(loop.time()):
            self._settle(pending, exc=Dropped("request cancelled or deadline passed"))
            return
        pending.queued_at = time.perf_counter()
        pending.preprocess_s = pending.queued_at - started
        self.batcher.submit(pending, image)

    def _settle(
        self, pending: Pending, entry: CachedImage | None = None, exc: BaseException | None = None
    ) -> None:
        self._pending.pop(pending.key, None)
        if pending.future.done():
            return
        if exc is not None:
            pending.future.set_exception(exc)
            pending.future.exception()  # retrieved: nobody may be waiting any more
        else:
            assert entry is not None
            self.cache.put(pending.key, entry)
            pending.future.set_result(entry)

    async def _publish(
        self, entries: list[CachedImage], consumer_host: str | None
    ) -> list[tensor_pb2.TensorHandle]:
        loop = asyncio.get_running_loop()
        tensors = [e.tensor for e in entries]
        job = loop.run_in_executor(self._publisher, self._publish_all, tensors, consumer_host)
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            job.add_done_callback(self._release_result)  # nobody will receive these handles
            raise

    def _publish_all(
        self, tensors: list[torch.Tensor], consumer_host: str | None
    ) -> list[tensor_pb2.TensorHandle]:
        handles: list[tensor_pb2.TensorHandle] = []
        try:
            for t in tensors:
                handles.append(self.producer.publish(t, peer_host=consumer_host))
        except BaseException as e:
            if isinstance(e, PoolExhaustedError):
                self.metrics.rejected.labels("pool_full").inc(len(tensors))
            for h in handles:
                self.producer.release(h.id)
            raise
        return handles

    def _release_result(self, job: asyncio.Future[list[tensor_pb2.TensorHandle]]) -> None:
        if not job.cancelled() and job.exception() is None:
            for h in job.result():
                self.producer.release(h.id)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
