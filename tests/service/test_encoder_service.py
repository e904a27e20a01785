"""The encoder service over real gRPC on loopback: handles, batching, cache, limits, health."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from common.config import ModelConfig
from common.contract import ImageLimits, PreprocessConfig
from common.grpc_bootstrap import ServerConfig
from common.rpc import encoder_pb2, encoder_pb2_grpc
from common.transfer import Consumer, TransferConfig, host_id
from services.encoder.__main__ import EncoderService, EncoderServiceConfig, create, start
from services.encoder.encoder import EncoderConfig
from services.encoder.preprocess import preprocess
from services.encoder.weights import load_vision_tower

SHM_PREFIX = f"epd-test-enc-{os.getpid()}-"


@pytest.fixture(scope="module", autouse=True)
def no_leaked_segments():
    yield
    left = sorted(p.name for p in Path("/dev/shm").glob(f"{SHM_PREFIX}*"))
    assert not left, f"shared-memory segments left behind: {left}"


@pytest.fixture(scope="module")
def consumer():
    with Consumer() as c:
        yield c


def config(
    model_dir, transport="shm", pool_bytes=8 << 20, metrics=False, max_pixels=1 << 24,
    max_image_bytes=20 << 20, max_images_per_request=16, **encoder,
) -> EncoderServiceConfig:  # fmt: skip
    limits = ImageLimits(max_images_per_request, max_image_bytes, max_pixels)
    return EncoderServiceConfig(
        model=str(model_dir),
        server=ServerConfig(
            host="127.0.0.1", port=0, grace_s=2.0, metrics_port=0 if metrics else None
        ),
        transfer=TransferConfig(backend=transport, pool_bytes=pool_bytes, shm_prefix=SHM_PREFIX),
        encoder=EncoderConfig(limits=limits, **encoder),
    )


def run(cfg: EncoderServiceConfig, body):
    async def main():
        service = await start(cfg)
        try:
            async with grpc.aio.insecure_channel(service.address) as channel:
                return await body(service, encoder_pb2_grpc.EncoderStub(channel))
        finally:
            await service.stop(0)

    return asyncio.run(main())


def request(*images: bytes, consumer_host: str | None = None) -> encoder_pb2.EncodeRequest:
    return encoder_pb2.EncodeRequest(
        images=[encoder_pb2.ImageData(data=b) for b in images],
        consumer_host=host_id() if consumer_host is None else consumer_host,
    )


async def fetch_all(consumer: Consumer, reply: encoder_pb2.EncodeReply) -> list[torch.Tensor]:
    return [await consumer.fetch_async(img.handle) for img in reply.images]


async def pool_drained(service: EncoderService, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while service.producer.bytes_in_use and time.monotonic() < end:
        await asyncio.sleep(0.02)
    return service.producer.bytes_in_use == 0


def sample(service: EncoderService, name: str) -> float:
    return service.metrics.registry.get_sample_value(name) or 0.0


def tower_outputs(model_dir: Path, images: list[bytes]) -> list[torch.Tensor]:
    """The vision tower run directly on each image alone (no service)."""
    tower = load_vision_tower(model_dir, ModelConfig.from_dir(model_dir))
    cfg = PreprocessConfig.from_dir(model_dir)
    out = []
    with torch.inference_mode():
        for raw in images:
            p = preprocess(raw, cfg)
            out.append(tower(p.pixel_values, [p.grid_thw])[0].clone())
    return out


def same_output(batched: torch.Tensor, alone: torch.Tensor) -> bool:
    """Batching changes an image's output only in the last bits: most sizes are bit-identical,
    but a tiny image (e.g. grid 1x4x6) takes another fp32 GEMM path once batched (~4e-8)."""
    return batched.shape == alone.shape and (batched - alone).abs().max().item() < 1e-6


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_fetched_embedding_equals_the_tower_and_transformers(
    tiny_model, oracle, png, consumer, transport
):
    raw = [png(150, 100, 1), png(40, 30, 2), png(600, 400, 3)]

    async def body(service, stub):
        reply = await stub.Encode(request(*raw), timeout=30)
        tensors = await fetch_all(consumer, reply)
        assert await pool_drained(service)
        return reply, tensors

    reply, tensors = run(config(tiny_model, transport), body)
    hf = oracle(tiny_model)
    inputs = hf.inputs(raw, "x")
    ref = hf.vision(inputs["pixel_values"], inputs["image_grid_thw"])
    levels = [ref.pooler_output, *ref.deepstack_features]
    sizes = [t.shape[0] for t in tensors]
    h = levels[0].shape[1]
    for i, (img, tensor, alone) in enumerate(
        zip(reply.images, tensors, tower_outputs(tiny_model, raw), strict=True)
    ):
        grid = (img.grid_thw.t, img.grid_thw.h, img.grid_thw.w)
        assert grid == tuple(inputs["image_grid_thw"][i].tolist())
        assert img.n_tokens == tensor.shape[0] == grid[0] * grid[1] * grid[2] // 4
        assert img.image_hash == hashlib.sha256(raw[i]).hexdigest() and not img.cache_hit
        assert img.handle.WhichOneof("location") == transport
        assert same_output(tensor, alone)
        for j, level in enumerate(levels):
            expected = level.split(sizes)[i]
            assert (tensor[:, j * h : (j + 1) * h] - expected).abs().max().item() < 1e-5


def test_identical_images_run_the_tower_once(tiny_model, png, consumer):
    a, b = png(150, 100, 7), png(64, 96, 8)

    async def body(service, stub):
        same = await stub.Encode(request(a, a), timeout=30)  # in one call
        again = await stub.Encode(request(a), timeout=30)  # later, from the cache
        both = await asyncio.gather(*(stub.Encode(request(b), timeout=30) for _ in range(2)))
        tensors = [await fetch_all(consumer, r) for r in [same, again, *both]]
        url = f"http://127.0.0.1:{service.server.metrics_port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
        return same, again, both, tensors, service.encoder.batcher.forwards, text, service

    same, again, both, tensors, forwards, text, service = run(
        config(tiny_model, metrics=True), body
    )
    assert forwards == 2  # one for a, one for b
    assert [i.cache_hit for i in same.images] == [False, True]
    assert again.images[0].cache_hit
    assert sorted(r.images[0].cache_hit for r in both) == [False, True]
    assert torch.equal(tensors[0][0], tensors[0][1]) and torch.equal(tensors[0][0], tensors[1][0])
    assert len({i.handle.id for r in [same, again] for i in r.images}) == 3  # a new handle each
    assert sample(service, "epd_encoder_cache_hits_total") == 3
    assert sample(service, "epd_encoder_cache_misses_total") == 2
    for name in [
        "epd_encoder_queue_depth", "epd_encoder_batch_images_bucket",
        "epd_encoder_encode_seconds_bucket", "epd_encoder_cache_hits_total",
        "epd_encoder_cache_misses_total", "epd_encoder_pool_bytes_in_use",
        "epd_transfer_tensors_total", "epd_transfer_bytes_total",
    ]:  # fmt: skip
        assert f"\n{name}" in text, name


def test_concurrent_requests_share_forwards(tiny_model, png, consumer):
    raw = [png(32 + 16 * i, 48 + 8 * i, 100 + i) for i in range(8)]

    async def body(service, stub):
        replies = await asyncio.gather(*(stub.Encode(request(r), timeout=30) for r in raw))
        tensors = [(await fetch_all(consumer, r))[0] for r in replies]
        return (
            tensors,
            service.encoder.batcher.forwards,
            sample(service, "epd_encoder_batch_images_sum"),
        )

    tensors, forwards, batched = run(config(tiny_model, max_wait_s=0.2), body)
    assert forwards < 8 and batched == 8
    for got, want in zip(tensors, tower_outputs(tiny_model, raw), strict=True):
        assert same_output(got, want)


def solid_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_images_fail_alone_with_the_reason(tiny_model, png, consumer):
    valid, other = png(150, 100, 11), png(80, 60, 12)
    cases = {
        "corrupt": (request(valid, b"definitely not an image"), "image 1: cannot decode image"),
        "truncated": (request(png(90, 90, 13)[:120]), "image 0: cannot decode image"),
        "empty": (request(b""), "image 0: image is empty"),
        "too many bytes": (request(other, png(300, 200, 14)), "image 1: "),
        "too many pixels": (request(solid_png(400, 400)), "image 0: image has 400x400"),
        "no images": (request(), "no images"),
        "too many images": (request(*[valid] * 5), "5 images, more than the limit 4"),
    }

    async def body(service, stub):
        calls = [stub.Encode(r, timeout=30) for r, _ in cases.values()]
        results = await asyncio.gather(stub.Encode(request(valid), timeout=30), *calls,
                                       return_exceptions=True)  # fmt: skip
        ok = results[0]
        tensors = await fetch_all(consumer, ok)
        return ok, tensors, results[1:], await pool_drained(service)

    cfg = config(
        tiny_model, max_pixels=300 * 300, max_wait_s=0.05, max_image_bytes=60_000,
        max_images_per_request=4,
    )  # fmt: skip
    ok, tensors, errors, drained = run(cfg, body)
    assert len(tensors) == 1 and tensors[0].shape[0] == ok.images[0].n_tokens
    for (name, (_, reason)), err in zip(cases.items(), errors, strict=True):
        assert isinstance(err, grpc.aio.AioRpcError), name
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.details())
        assert reason in err.details(), (name, err.details())
    assert "over the limit 60000" in errors[3].details()
    assert drained  # handles of valid images in failed calls were released


def test_full_queue_and_full_pool_are_resource_exhausted(tiny_model, png, consumer):
    async def queue_body(service, stub):
        first = asyncio.ensure_future(stub.Encode(request(png(64, 64, 1), png(64, 64, 2))))
        await asyncio.sleep(0.15)  # first is admitted and waits in the batch window
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Encode(request(png(64, 64, 3)), timeout=30)
        await fetch_all(consumer, await first)
        return err.value

    cfg = config(tiny_model, max_queue_images=2, max_images_per_request=2, max_wait_s=0.6)
    err = run(cfg, queue_body)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in err.details()

    # A 256x256 image is 64 tokens x 256 floats = 64 KiB on the wire: two do not fit.
    big = [png(256, 256, 20 + i) for i in range(3)]

    async def pool_body(service, stub):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Encode(request(*big), timeout=30)
        drained = await pool_drained(service)
        ok = await stub.Encode(request(big[0]), timeout=30)  # the service carries on
        await fetch_all(consumer, ok)
        return err.value, drained

    err, drained = run(config(tiny_model, pool_bytes=100_000), pool_body)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "pool" in err.details()
    assert drained


def test_expired_and_cancelled_requests_are_dropped_before_the_forward(tiny_model, png):
    async def body(service, stub):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Encode(request(png(64, 64, 30)), timeout=0.1)
        call = stub.Encode(request(png(64, 64, 31)))
        await asyncio.sleep(0.1)
        call.cancel()
        await asyncio.sleep(0.6)  # past the batch window
        return err.value, service.encoder.batcher.forwards, service.producer.bytes_in_use

    err, forwards, in_use = run(config(tiny_model, max_wait_s=0.4), body)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert forwards == 0 and in_use == 0


def test_health_goes_from_not_serving_to_serving(tiny_model, png):
    async def main():
        service = create(config(tiny_model))
        await service.server.start(service.registry)
        try:
            async with grpc.aio.insecure_channel(service.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                check = health_pb2.HealthCheckRequest(service="epd.encoder.v1.Encoder")
                before = (await health.Check(check)).status
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await encoder_pb2_grpc.EncoderStub(channel).Encode(request(png(64, 64, 1)))
                await service.load()
                after = (await health.Check(check)).status
                return before, err.value.code(), after
        finally:
            await service.stop(0)

    before, loading, after = asyncio.run(main())
    assert before == health_pb2.HealthCheckResponse.NOT_SERVING
    assert loading == grpc.StatusCode.UNAVAILABLE
    assert after == health_pb2.HealthCheckResponse.SERVING
