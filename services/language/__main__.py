"""`epd language`: the language service (gRPC `Language`, health, reflection, /metrics)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from common.contract import ReplicaInfo
from common.grpc_bootstrap import GrpcServer, ServerConfig, add_server_arguments, server_config
from common.lifecycle import serve_service, start_service, stop_service
from common.rpc import language_pb2, language_pb2_grpc
from common.tls import ClientTLS, add_client_tls_arguments, client_tls_from_args
from common.torch_thread import run_on_torch_thread
from common.transfer import Consumer, TransferConfig, host_id
from services.language.engine.builder import (
    EngineConfig,
    add_engine_arguments,
    build_engine,
    engine_config_from_args,
    warm_up,
)
from services.language.engine.engine import Engine
from services.language.metrics import LanguageMetrics
from services.language.servicer import LanguageServicer

log = logging.getLogger("epd.language")
DEFAULT_PORT = 50061


@dataclass(frozen=True)
class LanguageConfig:
    engine: EngineConfig
    server: ServerConfig
    pull_timeout_s: float = 30.0
    encoder_tls: ClientTLS | None = None  # TLS to encoders' TensorStore (grpc transport)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (VL or text-only)")
    add_server_arguments(parser, DEFAULT_PORT)
    add_engine_arguments(parser)
    parser.add_argument(
        "--pull-timeout",
        type=float,
        default=LanguageConfig.pull_timeout_s,
        help="seconds allowed to pull one request's images",
    )
    add_client_tls_arguments(parser, "encoder-", "encoders (TensorStore, grpc transport)")


def run(args: argparse.Namespace) -> int:
    cfg = LanguageConfig(
        engine=engine_config_from_args(args),
        server=server_config(args),
        pull_timeout_s=args.pull_timeout,
        encoder_tls=client_tls_from_args(args, "encoder-"),
    )
    return asyncio.run(serve_service(lambda: create(cfg)))


@dataclass
class LanguageService:
    """The language role (`common.lifecycle.Service`); tests drive it directly."""

    cfg: LanguageConfig
    server: GrpcServer
    servicer: LanguageServicer
    consumer: Consumer
    metrics: LanguageMetrics
    engine: Engine | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.registry

    async def load(self) -> None:
        engine = await run_on_torch_thread(build_engine, self.cfg.engine, self.metrics)
        await engine.start()
        self.engine = engine
        await warm_up(engine)
        self.servicer.info = replica_info(engine)
        self.servicer.engine = engine
        await self.server.set_serving()

    async def drain(self, grace_s: float) -> None:
        """Refuse new Generate calls; wait for the running ones."""
        self.servicer.draining = True
        end = time.monotonic() + grace_s
        while self.engine is not None and not self.engine.idle and time.monotonic() < end:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self.engine is not None:
            if self.engine.failure is not None:
                self.engine.runner.kill_workers()  # a forward still waiting on them fails now
            await self.engine.stop()
            await run_on_torch_thread(self.engine.close)
        self.consumer.close()

    async def failed(self) -> str:
        """Returns when the engine failed (a tensor-parallel rank lost)."""
        assert self.engine is not None  # after load
        await self.engine.failed.wait()
        return self.engine.failure or "the engine failed"

    async def stop(self, grace: float | None = None) -> None:
        await stop_service(self, grace)


def create(cfg: LanguageConfig) -> LanguageService:
    service = language_pb2.DESCRIPTOR.services_by_name["Language"].full_name
    server = GrpcServer(cfg.server, [service])
    consumer = Consumer(TransferConfig(client_tls=cfg.encoder_tls))
    servicer = LanguageServicer(None, consumer, pull_timeout_s=cfg.pull_timeout_s)
    language_pb2_grpc.add_LanguageServicer_to_server(servicer, server.server)
    return LanguageService(cfg, server, servicer, consumer, LanguageMetrics())


async def start(cfg: LanguageConfig) -> LanguageService:
    """Listen (health NOT_SERVING), load the model, warm up, then report SERVING."""
    service = create(cfg)
    await start_service(service)
    return service


def replica_info(engine: Engine) -> ReplicaInfo:
    cfg = engine.cfg
    return ReplicaInfo(cfg.model_type, engine.max_model_len, host_id(), engine.runner.block_size,
                       cfg.text.vocab_size)  # fmt: skip
