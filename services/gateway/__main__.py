"""`epd gateway`: the OpenAI-compatible HTTP and gRPC `Chat` front door over the encoder and
language pools. It runs no model and imports no torch."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry

from common.config import ModelConfig
from common.contract import PreprocessConfig, VideoPreprocessConfig
from common.contract.images import add_image_limit_arguments, image_limits_from_args
from common.contract.videos import add_video_limit_arguments, video_limits_from_args
from common.grpc_bootstrap import GrpcServer, ServerConfig, add_server_arguments, server_config
from common.lifecycle import never_fails, serve_service, start_service, stop_service
from common.rpc import gateway_pb2, gateway_pb2_grpc
from common.tls import ClientTLS, add_client_tls_arguments, client_tls_from_args
from common.tokenizer import ChatTokenizer
from services.gateway.backends import BackendPool
from services.gateway.grpc_api import ChatServicer
from services.gateway.http_api import DEFAULT_MAX_BODY_BYTES, HttpApi
from services.gateway.metrics import GatewayMetrics
from services.gateway.openai_protocol import Limits
from services.gateway.orchestrator import Orchestrator, OrchestratorConfig
from services.gateway.reasoning import PARSERS

log = logging.getLogger("epd.gateway")
DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 50071


@dataclass(frozen=True)
class GatewayConfig:
    model: str
    encoders: tuple[str, ...]
    language: tuple[str, ...]
    # The gRPC Chat server: host (HTTP listens there too), port, TLS (both front doors),
    # grace period, --metrics-port.
    server: ServerConfig = field(default_factory=lambda: ServerConfig(port=DEFAULT_GRPC_PORT))
    http_port: int = DEFAULT_HTTP_PORT
    api_key: str | None = None
    served_model_name: str | None = None
    limits: Limits = field(default_factory=Limits)
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    refresh_s: float = 2.0  # DNS re-resolution and health-check period
    backend_tls: ClientTLS | None = None  # TLS to encoders and language replicas

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).resolve().name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    o = OrchestratorConfig
    parser.add_argument(
        "--model",
        required=True,
        help="checkpoint directory (tokenizer, chat template and config only)",
    )
    parser.add_argument(
        "--encoders",
        default="",
        help="encoder addresses: host:port,... or dns:///name:port (VL models)",
    )
    parser.add_argument(
        "--language", required=True, help="language addresses: host:port,... or dns:///name:port"
    )
    add_server_arguments(parser, DEFAULT_HTTP_PORT, ("--port", "--http-port"),
                         "OpenAI HTTP port (0 = any free)")  # fmt: skip
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT, help="gRPC Chat port")
    parser.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health",
    )
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="model name clients use (default: the model directory's name)",
    )
    parser.add_argument(
        "--allowed-local-media-path",
        default=None,
        help="directory file:// image and video URLs may read from (default: none)",
    )
    add_image_limit_arguments(parser)
    add_video_limit_arguments(parser)
    parser.add_argument(
        "--video-chunk-patches",
        type=int,
        default=o.video_chunk_patches,
        help="patches (temporal patches x h x w) one Encode call gets of a video at most; a "
        "longer video is split into chunks of temporal patches encoded in parallel on several "
        "encoders (keep it at or below the encoders' --max-batch-patches)",
    )
    g = parser.add_argument_group("admission and deadlines")
    g.add_argument(
        "--max-in-flight-requests",
        type=int,
        default=o.max_in_flight,
        help="requests served at once; beyond it new ones get 429 with Retry-After",
    )
    g.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="HTTP request bodies larger than this get 413",
    )
    g.add_argument(
        "--encode-timeout",
        type=float,
        default=o.encode_timeout_s,
        help="seconds one encoder gets before the image is retried on another",
    )
    g.add_argument(
        "--request-timeout",
        type=float,
        default=o.request_timeout_s,
        help="seconds one request may take in all: encodes, retries and generation",
    )
    parser.add_argument(
        "--reasoning-parser",
        choices=PARSERS,
        default=None,
        help="split reasoning models' <think>...</think> into message.reasoning_content / "
        "delta.reasoning_content (qwen3: Qwen3-VL-Thinking checkpoints); default: none",
    )
    add_client_tls_arguments(parser, "backend-", "encoders and language replicas")


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    media = Path(args.allowed_local_media_path) if args.allowed_local_media_path else None
    return GatewayConfig(
        model=args.model,
        encoders=tuple(a for a in args.encoders.split(",") if a.strip()),
        language=tuple(a for a in args.language.split(",") if a.strip()),
        server=dataclasses.replace(server_config(args), port=args.grpc_port),
        http_port=args.port,
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        limits=Limits(image_limits_from_args(args), media, video_limits_from_args(args)),
        orchestrator=OrchestratorConfig(
            encode_timeout_s=args.encode_timeout,
            request_timeout_s=args.request_timeout,
            max_in_flight=args.max_in_flight_requests,
            reasoning_parser=args.reasoning_parser,
            video_chunk_patches=args.video_chunk_patches,
        ),
        max_body_bytes=args.max_request_body_bytes,
        backend_tls=client_tls_from_args(args, "backend-"),
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    return asyncio.run(serve_service(lambda: create(cfg)))


@dataclass
class GatewayService:
    """The gateway role (`common.lifecycle.Service`): SERVING once every pool has a healthy
    backend (they may come up after the gateway)."""

    cfg: GatewayConfig
    server: GrpcServer
    http: HttpApi
    runner: web.AppRunner
    pools: list[BackendPool]
    metrics: GatewayMetrics
    orchestrator: Orchestrator
    http_port: int = 0
    wait_s: float = 0.0  # `load` waits this long for healthy backends
    _health: asyncio.Task[None] | None = None

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.registry

    @property
    def base_url(self) -> str:
        scheme = "https" if self.cfg.server.tls_cert else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}/v1"

    def ready(self) -> bool:
        return all(p.healthy for p in self.pools)

    async def load(self) -> None:
        for pool in self.pools:
            await pool.start()
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.cfg.server.host, self.cfg.http_port,
                           ssl_context=_ssl_context(self.cfg.server))  # fmt: skip
        await site.start()
        self.http_port = self.runner.addresses[0][1]
        log.info("gateway for %s: HTTP :%d (OpenAI API), gRPC :%d", self.cfg.model_name,
                 self.http_port, self.server.port)  # fmt: skip
        for pool in self.pools:
            await pool.wait_healthy(self.wait_s)
        if self.ready():
            await self.server.set_serving()
        else:
            self._health = asyncio.create_task(self._serving_when_ready())

    async def _serving_when_ready(self) -> None:
        while not self.ready():
            await asyncio.sleep(self.cfg.refresh_s)
        await self.server.set_serving()

    async def drain(self, grace_s: float) -> None:
        """Stop taking HTTP connections; let the requests in flight finish."""
        for site in list(self.runner.sites):
            await site.stop()
        end = time.monotonic() + grace_s
        while self.orchestrator.in_flight and time.monotonic() < end:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self._health is not None:
            self._health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health
        await self.runner.cleanup()
        for pool in self.pools:
            await pool.stop()

    async def failed(self) -> str:
        return await never_fails()

    async def stop(self, grace: float | None = None) -> None:
        await stop_service(self, grace)


def create(cfg: GatewayConfig) -> GatewayService:
    model_cfg = ModelConfig.from_dir(cfg.model)
    tokenizer = ChatTokenizer(cfg.model)
    preprocess = PreprocessConfig.from_dir(cfg.model) if model_cfg.is_multimodal else None
    if model_cfg.is_multimodal and not cfg.encoders:
        log.warning("no --encoders given: requests with images will be refused")
    metrics = GatewayMetrics()
    tls, down = cfg.backend_tls, metrics.marked_down
    encoders = (
        BackendPool("encoder", cfg.encoders, cfg.refresh_s, tls=tls, marked_down=down)
        if cfg.encoders
        else None
    )
    language = BackendPool("language", cfg.language, cfg.refresh_s, tls=tls, marked_down=down)
    pools = [p for p in (encoders, language) if p is not None]
    video = VideoPreprocessConfig.from_dir(cfg.model) if model_cfg.is_multimodal else None
    orchestrator = Orchestrator(model_cfg, tokenizer, encoders, language, metrics,
                                cfg.orchestrator, preprocess, video)  # fmt: skip
    service_name = gateway_pb2.DESCRIPTOR.services_by_name["Chat"].full_name
    server = GrpcServer(cfg.server, [service_name])
    gateway_pb2_grpc.add_ChatServicer_to_server(
        ChatServicer(orchestrator, cfg.model_name, cfg.limits, cfg.api_key), server.server
    )
    http = HttpApi(orchestrator, cfg.model_name, cfg.limits, cfg.api_key,
                   lambda: bool(language.healthy) and (encoders is None or bool(encoders.healthy)),
                   cfg.max_body_bytes)  # fmt: skip
    runner = web.AppRunner(http.app, handler_cancellation=True, access_log=None)
    return GatewayService(cfg, server, http, runner, pools, metrics, orchestrator)


async def start(cfg: GatewayConfig, wait_s: float = 0.0) -> GatewayService:
    """Listen, start the pools and wait up to `wait_s` for healthy backends."""
    service = create(cfg)
    service.wait_s = wait_s
    await start_service(service)
    return service


def _ssl_context(cfg: ServerConfig) -> ssl.SSLContext | None:
    """The HTTP side's TLS, from the same files as the gRPC side's."""
    if cfg.tls_cert is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    if cfg.tls_ca is not None:
        ctx.load_verify_locations(cfg.tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
