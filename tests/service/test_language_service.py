"""The language service over real gRPC on loopback: images pulled by handle, failures contained."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.config import ModelConfig
from common.contract import Cause, fault_of
from common.grpc_bootstrap import ServerConfig
from common.rpc import language_pb2, language_pb2_grpc, tensor_pb2
from common.transfer import Producer, TransferConfig
from common.transfer.loopback import LoopbackProducer
from services.colocated import ColocatedPipeline
from services.language.__main__ import LanguageConfig, LanguageService, start
from services.language.engine.builder import EngineConfig
from services.language.engine.scheduler import SchedulerConfig

SHM_PREFIX = f"epd-test-lang-{os.getpid()}-"


def config(model_dir, max_image_bytes_held=2 << 30, **sched) -> LanguageConfig:
    return LanguageConfig(
        engine=EngineConfig(
            str(model_dir),
            SchedulerConfig(**sched),
            kv_cache_bytes=8 << 20,
            max_image_bytes_held=max_image_bytes_held,
        ),
        server=ServerConfig(host="127.0.0.1", port=0, grace_s=2.0),
        pull_timeout_s=5.0,
    )


def run(coro):
    return asyncio.run(coro)


async def with_service(cfg: LanguageConfig, body):
    service = await start(cfg)
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            return await body(service, language_pb2_grpc.LanguageStub(channel), channel)
    finally:
        await service.stop(0)


def request(ids, max_tokens=8, images=(), rid="", **sampling) -> language_pb2.GenerateRequest:
    return language_pb2.GenerateRequest(
        request_id=rid,
        prompt_token_ids=ids,
        images=list(images),
        sampling=language_pb2.SamplingParams(max_tokens=max_tokens, **sampling),
    )


async def collect(stub, req, timeout=60.0):
    tokens, finished = [], None
    async for msg in stub.Generate(req, timeout=timeout):
        if msg.HasField("tokens"):
            tokens += list(msg.tokens.token_ids)
        else:
            finished = msg.finished
    return tokens, finished


def image_ref(handle, grid, image_hash="h") -> language_pb2.ImageRef:
    t, h, w = grid
    return language_pb2.ImageRef(
        handle=handle, grid_thw=language_pb2.GridTHW(t=t, h=h, w=w), image_hash=image_hash
    )


async def wait_idle(service: LanguageService, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if service.engine.idle and service.engine.blocks.num_used == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{service.engine.blocks.num_used} KV blocks still in use")


def test_image_request_through_handles_matches_transformers(tiny_model, oracle, png):
    pipe = ColocatedPipeline(tiny_model)
    raw = [png(150, 100, 21), png(64, 96, 22)]
    tensors, grids = pipe.encode_images(raw)
    ids = pipe.prompt_ids("What is here?", 2, [t.shape[0] for t in tensors])
    hf = oracle(tiny_model)
    want = hf.generate(hf.inputs(raw, "What is here?"), 12)

    async def body(service, stub, channel):
        with Producer(
            TransferConfig(backend="shm", pool_bytes=8 << 20, shm_prefix=SHM_PREFIX)
        ) as p:
            refs = [image_ref(p.publish(t), g, f"img{i}") for i, (t, g) in
                    enumerate(zip(tensors, grids, strict=True))]  # fmt: skip
            tokens, finished = await collect(stub, request(ids, 12, refs))
            health = health_pb2_grpc.HealthStub(channel)
            status = await health.Check(health_pb2.HealthCheckRequest(service=""))
            await wait_idle(service)
            assert p.bytes_in_use == 0  # every handle was acknowledged
        return tokens, finished, status.status

    tokens, finished, status = run(with_service(config(tiny_model), body))
    assert tokens == want
    assert finished.usage.prompt_tokens == len(ids)
    assert finished.usage.completion_tokens == len(tokens)
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_text_only_service_on_a_plain_text_checkpoint(tiny_text_moe, oracle):
    pipe = ColocatedPipeline(tiny_text_moe)
    ids = pipe.prompt_ids("Hello!", 0, [])
    hf = oracle(tiny_text_moe)

    async def body(service, stub, channel):
        return await collect(stub, request(ids, 10))

    tokens, finished = run(with_service(config(tiny_text_moe), body))
    assert tokens == hf.generate(hf.inputs([], "Hello!"), 10)
    assert finished.reason in (language_pb2.FINISH_REASON_STOP, language_pb2.FINISH_REASON_LENGTH)


@pytest.mark.parametrize(
    ("req_kwargs", "field"),
    [
        ({"ids": []}, "prompt is empty"),
        ({"ids": [1, 2, 99999]}, "outside the vocabulary"),
        ({"ids": [1, 2], "max_tokens": 10**9}, "maximum context length"),
        ({"ids": [1, 2], "stop_token_ids": [99999]}, "stop_token_ids"),
        ({"ids": [1, 2], "temperature": -0.5}, "temperature"),
        ({"ids": [1, 2], "top_p": 1.5}, "top_p"),
        ({"ids": [1, 2], "top_p": 0.0}, "top_p"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(tiny_model, req_kwargs, field):
    async def body(service, stub, channel):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, request(**req_kwargs))
        ok = await collect(stub, request([1, 2, 3], 2))  # the service carries on
        return err.value, ok

    err, ok = run(with_service(config(tiny_model), body))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.details()
    assert fault_of(err).cause == Cause.REQUEST
    assert len(ok[0]) == 2


def test_images_disagreeing_with_the_prompt_are_invalid(tiny_model):
    async def body(service, stub, channel):
        with Producer(
            TransferConfig(backend="shm", pool_bytes=1 << 20, shm_prefix=SHM_PREFIX)
        ) as p:
            handle = p.publish(torch.zeros(4, 256))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, request([1, 2, 3], 4, [image_ref(handle, (1, 4, 4))]))
            await wait_idle(service)
            return err.value

    err = run(with_service(config(tiny_model), body))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "image-pad" in err.details()


def test_unfetchable_handle_is_unavailable_and_leaves_the_service_clean(tiny_model):
    bogus = tensor_pb2.TensorHandle(
        id="0" * 32, dtype=tensor_pb2.DTYPE_FLOAT32, shape=[4, 256], nbytes=4096,
        expiry_unix_ms=int(time.time() * 1000) + 60_000,
        grpc=tensor_pb2.GrpcLocation(address="127.0.0.1:1"),
    )  # fmt: skip
    ids = [1] + [12] * 4 + [2]

    async def body(service, stub, channel):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, request(ids, 4, [image_ref(bogus, (1, 4, 4))]))
        await wait_idle(service)
        ok = await collect(stub, request([1, 2, 3], 2))
        return err.value, ok

    err, ok = run(with_service(config(tiny_model), body))
    # The encoder is at fault, not this replica: the code is the transfer error's, and the
    # trailing metadata names the image, its producer and the reason.
    fault = fault_of(err)
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "image 0" in err.details()
    assert fault.cause == Cause.IMAGE and fault.image_index == 0
    assert fault.producer == "127.0.0.1:1" and fault.reason == "producer_lost"
    assert len(ok[0]) == 2


def test_encoder_killed_before_the_pull(tiny_model):
    ids = [1] + [12] * 4 + [2]

    async def body(service, stub, channel):
        producer = LoopbackProducer("grpc", pool_mib=4, shm_prefix=SHM_PREFIX)
        try:
            handle = producer.publish(torch.float32, (4, 256))
            producer.signal(signal.SIGKILL)
            producer.proc.wait()
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, request(ids, 4, [image_ref(handle, (1, 4, 4))]))
            elapsed = time.monotonic() - started
        finally:
            producer.close()
        await wait_idle(service)
        return err.value, elapsed

    err, elapsed = run(with_service(config(tiny_model), body))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert fault_of(err).cause == Cause.IMAGE and fault_of(err).reason == "producer_lost"
    assert elapsed < 2.0


def test_client_disconnect_mid_stream_frees_the_request(tiny_model):
    async def body(service, stub, channel):
        call = stub.Generate(request([1, 2, 3, 4], 2000, ignore_eos=True))
        got = 0
        async for msg in call:
            got += len(msg.tokens.token_ids)
            if got >= 3:
                break
        call.cancel()
        await wait_idle(service)
        return got, service.engine.metrics.finished.labels("abort")._value.get()

    got, aborted = run(with_service(config(tiny_model), body))
    assert got >= 3 and aborted == 1


def test_abort_rpc_ends_the_stream(tiny_model):
    async def body(service, stub, channel):
        async def reader():
            return await collect(stub, request([1, 2, 3], 2000, rid="r-1", ignore_eos=True))

        task = asyncio.create_task(reader())
        while "r-1" not in service.engine.running_ids:
            await asyncio.sleep(0.01)
        reply = await stub.Abort(language_pb2.AbortRequest(request_id="r-1"))
        _, finished = await task
        await wait_idle(service)
        return reply.found, finished

    found, finished = run(with_service(config(tiny_model), body))
    assert found and finished.reason == language_pb2.FINISH_REASON_ABORT


def test_too_many_waiting_requests_is_resource_exhausted(tiny_model):
    async def body(service, stub, channel):
        calls = [collect(stub, request([1, 2, 3, i], 64, ignore_eos=True)) for i in range(6)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        await wait_idle(service)
        return results

    results = run(with_service(config(tiny_model, max_num_seqs=1, max_waiting=1), body))
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert errors and all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors)
    assert all(fault_of(e).cause == Cause.REPLICA for e in errors)
    assert any(not isinstance(r, BaseException) for r in results)


def test_image_byte_budget_refuses_before_pulling(tiny_model):
    """Beyond --max-image-bytes-held a request is refused before its images are pulled: its
    handle is still at the producer, for the caller to retry elsewhere."""
    ids = [1] + [12] * 4 + [2]

    async def body(service, stub, channel):
        with Producer(
            TransferConfig(backend="shm", pool_bytes=1 << 20, shm_prefix=SHM_PREFIX)
        ) as p:
            first = p.publish(torch.zeros(4, 256))
            second = p.publish(torch.ones(4, 256))
            slot = p.bytes_in_use // 2  # the two images take equal slots
            call = stub.Generate(request(ids, 2000, [image_ref(first, (1, 4, 4))],
                                         ignore_eos=True))  # fmt: skip
            await call.read()  # a token: the first request holds its image bytes
            # the first image's slot is freed once its pull is acknowledged, which can come
            # after the first token on a busy host; then only the second image's slot is left
            until = time.monotonic() + 10
            while p.bytes_in_use > slot and time.monotonic() < until:
                await asyncio.sleep(0.01)
            waiting = p.bytes_in_use
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, request(ids, 4, [image_ref(second, (1, 4, 4))]))
            unpulled = (waiting, p.bytes_in_use)
            call.cancel()
            await wait_idle(service)
            held = service.engine.held_image_bytes
        return err.value, unpulled, held

    err, unpulled, held = run(with_service(config(tiny_model, max_image_bytes_held=6000), body))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "image tensors" in err.details()
    assert fault_of(err).cause == Cause.REPLICA
    assert unpulled[0] > 0 and unpulled[1] == unpulled[0]  # the second image was never pulled
    assert held == 0


def test_get_info_reports_the_effective_max_model_len(tiny_model):
    async def body(service, stub, channel):
        return await stub.GetInfo(language_pb2.GetInfoRequest())

    info = run(with_service(config(tiny_model), body))
    cfg = ModelConfig.from_dir(tiny_model)
    assert info.max_model_len == min(cfg.text.max_position_embeddings, info.max_model_len)
    assert info.vocab_size == cfg.text.vocab_size and info.block_size == 16
