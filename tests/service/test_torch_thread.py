"""Each service process keeps its torch work on one thread (`common.torch_thread`): loading,
warm-up and every forward. A second thread running torch would give libgomp a second OpenMP
team and throttle its spin-wait for the whole process."""

from __future__ import annotations

import asyncio
import threading

import grpc

from common.grpc_bootstrap import ServerConfig
from common.rpc import encoder_pb2, encoder_pb2_grpc, language_pb2, language_pb2_grpc
from common.torch_thread import call_on_torch_thread, on_torch_thread_now, run_on_torch_thread
from common.transfer import TransferConfig, host_id
from services.encoder import __main__ as encoder_main
from services.encoder.batcher import Batcher
from services.encoder.encoder import EncoderConfig
from services.language import __main__ as language_main
from services.language.engine import builder
from services.language.engine.model_runner import ModelRunner
from services.language.engine.scheduler import SchedulerConfig
from tests.conftest import png_bytes


def test_one_thread_and_inline_reentry():
    ident = call_on_torch_thread(threading.get_ident)
    assert ident != threading.get_ident()
    assert not on_torch_thread_now()
    assert asyncio.run(run_on_torch_thread(threading.get_ident)) == ident
    # Called from the torch thread itself it runs inline instead of waiting on itself.
    assert call_on_torch_thread(call_on_torch_thread, threading.get_ident) == ident


def _recording(calls: list[int], fn):
    def wrapper(*args, **kwargs):
        calls.append(threading.get_ident())
        return fn(*args, **kwargs)

    return wrapper


def test_language_service_loads_and_runs_on_the_torch_thread(tiny_model, monkeypatch):
    calls: dict[str, list[int]] = {"load": [], "prepare": [], "run": []}
    monkeypatch.setattr(builder, "load_decoder", _recording(calls["load"], builder.load_decoder))
    monkeypatch.setattr(ModelRunner, "prepare", _recording(calls["prepare"], ModelRunner.prepare))
    monkeypatch.setattr(ModelRunner, "run", _recording(calls["run"], ModelRunner.run))
    cfg = language_main.LanguageConfig(
        engine=builder.EngineConfig(str(tiny_model), SchedulerConfig(), kv_cache_bytes=8 << 20),
        server=ServerConfig(host="127.0.0.1", port=0, grace_s=2.0),
    )

    async def main() -> None:
        service = await language_main.start(cfg)
        try:
            async with grpc.aio.insecure_channel(service.address) as channel:
                stub = language_pb2_grpc.LanguageStub(channel)
                req = language_pb2.GenerateRequest(
                    prompt_token_ids=[5, 6, 7, 8],
                    sampling=language_pb2.SamplingParams(max_tokens=3, ignore_eos=True),
                )
                async for _ in stub.Generate(req, timeout=60):
                    pass
        finally:
            await service.stop(0)

    asyncio.run(main())
    ident = call_on_torch_thread(threading.get_ident)
    # warm-up and the request: at least two prepares and 2 + 3 forwards
    assert len(calls["load"]) == 1 and len(calls["prepare"]) >= 2 and len(calls["run"]) >= 5
    assert {i for v in calls.values() for i in v} == {ident}


def test_encoder_service_loads_and_runs_on_the_torch_thread(tiny_model, monkeypatch):
    calls: dict[str, list[int]] = {"load": [], "forward": []}
    monkeypatch.setattr(
        encoder_main,
        "load_vision_tower",
        _recording(calls["load"], encoder_main.load_vision_tower),
    )
    monkeypatch.setattr(Batcher, "forward", _recording(calls["forward"], Batcher.forward))
    cfg = encoder_main.EncoderServiceConfig(
        model=str(tiny_model),
        server=ServerConfig(host="127.0.0.1", port=0, grace_s=2.0),
        transfer=TransferConfig(backend="grpc", pool_bytes=8 << 20),
        encoder=EncoderConfig(),
    )

    async def main() -> None:
        service = await encoder_main.start(cfg)
        try:
            async with grpc.aio.insecure_channel(service.address) as channel:
                stub = encoder_pb2_grpc.EncoderStub(channel)
                images = [encoder_pb2.ImageData(data=png_bytes(64, 48, seed=s)) for s in (1, 2)]
                await stub.Encode(
                    encoder_pb2.EncodeRequest(images=images, consumer_host=host_id()), timeout=60
                )
        finally:
            await service.stop(0)

    asyncio.run(main())
    ident = call_on_torch_thread(threading.get_ident)
    assert len(calls["load"]) == 1 and len(calls["forward"]) >= 2  # warm-up + the request
    assert {i for v in calls.values() for i in v} == {ident}
