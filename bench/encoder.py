"""`epd bench-encoder`: encoder images/s with dynamic batching vs one image per forward, one run.
With `--video`: videos instead, in sampled frames/s and video tokens/s.

Both modes serve the same stream of distinct, mixed-size images through the real service (the
gRPC server in this process on loopback, real transfer: each client fetches and acknowledges
every handle, as the language service would). `--clients` closed-loop clients each send one
image per call. The cache is off, so every image runs the tower. Modes alternate for `--rounds`
rounds; the best round of each is reported, so a burst of load from elsewhere on the machine
hurts both alike.

- `batched`: the service defaults (max patches / images per forward, short batch window);
- `single`: `max_batch_images = 1`, everything else equal.

It also measures the ceiling batching can reach on this machine: the same images, already
preprocessed, through the tower alone (no serving) one per forward vs `--clients` per forward.
On a CPU the tower is compute-bound, so that ceiling is close to 1x; the served speedup can only
approach it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.generate import synthetic_image
from bench.media import synthetic_video
from common.dtypes import DTYPES
from common.grpc_bootstrap import ServerConfig
from common.rpc import encoder_pb2, encoder_pb2_grpc
from common.torch_thread import run_on_torch_thread
from common.transfer import Consumer, TransferConfig, host_id
from services.encoder.__main__ import EncoderServiceConfig, start
from services.encoder.batcher import Batcher
from services.encoder.encoder import EncoderConfig
from services.encoder.preprocess import ProcessedImage, preprocess

DEFAULT_SIZES = "224x224,640x480,96x96,512x384,320x320,160x120,800x600,384x256"


@dataclass
class Result:
    mode: str
    images: int
    seconds: float
    forwards: int

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/small", help="checkpoint directory")
    parser.add_argument("--images", type=int, default=48, help="images per mode and round")
    parser.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="WxH image sizes, cycled")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per mode")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="tower dtype")
    parser.add_argument("--json", action="store_true", help="print JSON, not a table")
    v = parser.add_argument_group("videos (instead of images)")
    v.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="video file to encode (repeat); 'synthetic' makes --synthetic-videos "
                   "distinct H.264 clips of --video-size and --video-frames at 10 fps")  # fmt: skip
    v.add_argument("--synthetic-videos", type=int, default=8, help="clips per round")
    v.add_argument("--video-size", default="160x120", help="WxH of the synthetic clips")
    v.add_argument("--video-frames", type=int, default=40, help="frames per synthetic clip")


def run(args: argparse.Namespace) -> int:
    if args.video:
        return _run_videos(args)
    sizes = [_size(s) for s in args.sizes.split(",") if s]
    if args.images <= 0 or args.clients <= 0 or args.rounds <= 0 or not sizes:
        raise ValueError("--images, --clients and --rounds must be positive, --sizes non-empty")
    cycle = itertools.cycle(sizes)
    # Distinct images (new seeds) in every round, so nothing could ever be served from memory.
    streams = [
        [synthetic_image(*next(cycle), seed=r * 100_000 + i) for i in range(args.images)]
        for r in range(args.rounds)
    ]
    best: dict[str, Result] = {}
    ceiling: dict[str, float] = {}
    for r in range(args.rounds):
        for mode in ("single", "batched"):
            result = asyncio.run(_measure(args, mode, streams[r], ceiling))
            if mode not in best or result.images_per_s > best[mode].images_per_s:
                best[mode] = result
    ratio = best["batched"].images_per_s / best["single"].images_per_s
    if args.json:
        rows = [{**vars(r), "images_per_s": round(r.images_per_s, 2)} for r in best.values()]
        tower = {k: round(v, 3) for k, v in ceiling.items()}
        print(json.dumps({"results": rows, "speedup": round(ratio, 3), "tower_only": tower}))
    else:
        _print_table(list(best.values()), ratio, args.clients)
        _print_ceiling(ceiling, args.clients)
    return 0


def _size(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


async def _measure(
    args: argparse.Namespace, mode: str, images: list[bytes], ceiling: dict[str, float]
) -> Result:
    batching = EncoderConfig(cache_bytes=0, max_batch_images=64 if mode == "batched" else 1)
    cfg = EncoderServiceConfig(
        model=args.model,
        server=ServerConfig(host="127.0.0.1", port=0, max_message_bytes=64 << 20),
        transfer=TransferConfig(backend="shm", pool_bytes=256 << 20, shm_prefix="epd-bench-"),
        encoder=batching,
        dtype=args.dtype,
    )
    service = await start(cfg)
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = encoder_pb2_grpc.EncoderStub(channel)
            with Consumer() as consumer:
                await _drive(stub, consumer, images[: args.clients], args.clients)  # warm-up
                assert service.encoder is not None
                forwards = service.encoder.batcher.forwards
                started = time.perf_counter()
                await _drive(stub, consumer, images, args.clients)
                seconds = time.perf_counter() - started
                forwards = service.encoder.batcher.forwards - forwards
            if mode == "batched":
                pre = [preprocess(data, service.encoder.preprocess_cfg) for data in images]
                for key, value in (await _tower_only(service.encoder.batcher, pre, args)).items():
                    ceiling[key] = max(ceiling.get(key, 0.0), value)
    finally:
        await service.stop(0)
    return Result(mode, len(images), seconds, forwards)


async def _drive(
    stub: encoder_pb2_grpc.EncoderStub, consumer: Consumer, images: list[bytes], clients: int
) -> None:
    queue = iter(images)
    host = host_id()

    async def client() -> None:
        for data in queue:  # shared iterator: each image is sent once, by whichever is free
            req = encoder_pb2.EncodeRequest(images=[encoder_pb2.ImageData(data=data)],
                                            consumer_host=host)  # fmt: skip
            reply = await stub.Encode(req, timeout=300)
            await consumer.fetch_async(reply.images[0].handle)

    await asyncio.gather(*(client() for _ in range(clients)))


async def _tower_only(
    batcher: Batcher, images: list[ProcessedImage], args: argparse.Namespace
) -> dict[str, float]:
    """Images/s of the bare tower: one image per forward vs groups of `--clients` images (cut
    where `max_batch_patches` would cut them), the same images in the same order."""
    groups: list[list[ProcessedImage]] = [[]]
    for image in images:
        patches = sum(i.pixel_values.shape[0] for i in groups[-1]) + image.pixel_values.shape[0]
        if groups[-1] and (len(groups[-1]) >= args.clients or patches > batcher.max_batch_patches):
            groups.append([])
        groups[-1].append(image)

    def timed(batches: list[list[ProcessedImage]]) -> float:
        started = time.perf_counter()
        for batch in batches:
            batcher.forward([i.pixel_values for i in batch], [i.grid_thw for i in batch])
        return len(images) / (time.perf_counter() - started)

    single = await run_on_torch_thread(timed, [[i] for i in images])
    batched = await run_on_torch_thread(timed, groups)
    return {"single_images_per_s": single, "batched_images_per_s": batched}


def _print_ceiling(ceiling: dict[str, float], clients: int) -> None:
    single, batched = ceiling["single_images_per_s"], ceiling["batched_images_per_s"]
    print(f"tower alone, no serving: {single:.2f} images/s one per forward, {batched:.2f} with "
          f"up to {clients} per forward: ceiling {batched / single:.2f}x")  # fmt: skip


def _print_table(results: list[Result], ratio: float, clients: int) -> None:
    print(f"{'mode':<8}{'images':>8}{'seconds':>10}{'images/s':>10}{'forwards':>10}"
          f"{'imgs/fwd':>10}")  # fmt: skip
    for r in results:
        print(f"{r.mode:<8}{r.images:>8}{r.seconds:>10.2f}{r.images_per_s:>10.2f}"
              f"{r.forwards:>10}{r.images / max(r.forwards, 1):>10.2f}")  # fmt: skip
    print(f"batched / single at {clients} clients: {ratio:.2f}x")


@dataclass
class VideoResult:
    mode: str
    videos: int
    frames: int  # sampled frames through the tower
    tokens: int
    seconds: float
    forwards: int


def _run_videos(args: argparse.Namespace) -> int:
    """Videos through the encoder service, batched vs one per forward: sampled frames/s and
    video tokens/s (each client sends one video per call; the cache is off)."""
    files = [p for p in args.video if p != "synthetic"]
    width, height = _size(args.video_size)
    rounds: list[list[bytes]] = []
    for r in range(args.rounds):
        clips = [Path(p).read_bytes() for p in files]
        if "synthetic" in args.video:
            clips += [synthetic_video(width, height, args.video_frames, 10, seed=r * 1000 + i)
                      for i in range(args.synthetic_videos)]  # fmt: skip
        rounds.append(clips)
    best: dict[str, VideoResult] = {}
    for r in range(args.rounds):
        for mode in ("single", "batched"):
            res = asyncio.run(_measure_videos(args, mode, rounds[r]))
            if (
                mode not in best
                or res.tokens / res.seconds > best[mode].tokens / best[mode].seconds
            ):
                best[mode] = res
    rows = [{**vars(b), "frames_per_s": round(b.frames / b.seconds, 2),
             "tokens_per_s": round(b.tokens / b.seconds, 1)} for b in best.values()]  # fmt: skip
    ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    if args.json:
        print(json.dumps({"results": rows, "speedup": round(ratio, 3)}))
        return 0
    print(f"{'mode':<8}{'videos':>7}{'frames':>8}{'tokens':>8}{'seconds':>9}{'frames/s':>10}"
          f"{'tokens/s':>10}{'forwards':>10}")  # fmt: skip
    for row in rows:
        print(f"{row['mode']:<8}{row['videos']:>7}{row['frames']:>8}{row['tokens']:>8}"
              f"{row['seconds']:>9.2f}{row['frames_per_s']:>10.2f}{row['tokens_per_s']:>10.1f}"
              f"{row['forwards']:>10}")  # fmt: skip
    print(f"batched / single at {args.clients} clients: {ratio:.2f}x")
    return 0


async def _measure_videos(args: argparse.Namespace, mode: str, clips: list[bytes]) -> VideoResult:
    batching = EncoderConfig(cache_bytes=0, max_batch_images=64 if mode == "batched" else 1)
    cfg = EncoderServiceConfig(
        model=args.model,
        server=ServerConfig(host="127.0.0.1", port=0, max_message_bytes=256 << 20),
        transfer=TransferConfig(backend="shm", pool_bytes=256 << 20, shm_prefix="epd-bench-"),
        encoder=batching,
        dtype=args.dtype,
    )
    service = await start(cfg)
    frames = tokens = 0
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = encoder_pb2_grpc.EncoderStub(channel)
            with Consumer() as consumer:

                async def drive(items: list[bytes]) -> None:
                    nonlocal frames, tokens
                    queue = iter(items)

                    async def client() -> None:
                        nonlocal frames, tokens
                        for data in queue:
                            req = encoder_pb2.EncodeRequest(
                                videos=[encoder_pb2.VideoData(data=data)], consumer_host=host_id()
                            )
                            out = (await stub.Encode(req, timeout=600)).videos[0]
                            await consumer.fetch_async(out.handle)
                            frames += 2 * out.grid_thw.t  # sampled frames, padded to patches
                            tokens += out.n_tokens

                    await asyncio.gather(*(client() for _ in range(args.clients)))

                await drive(clips[: args.clients])  # warm-up
                frames = tokens = 0
                assert service.encoder is not None
                forwards = service.encoder.batcher.forwards
                started = time.perf_counter()
                await drive(clips)
                seconds = time.perf_counter() - started
                forwards = service.encoder.batcher.forwards - forwards
    finally:
        await service.stop(0)
    return VideoResult(mode, len(clips), frames, tokens, seconds, forwards)
