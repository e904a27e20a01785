"""`epd gateway`: the OpenAI-compatible HTTP and gRPC `Chat` front door over the encoder and
language pools."""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from common.config import ModelConfig
from common.grpc_bootstrap import GrpcServer, ServerConfig
from common.rpc import gateway_pb2, gateway_pb2_grpc
from common.tls import ClientTLS, add_client_tls_arguments, client_tls_from_args
from common.tokenizer import ChatTokenizer
from services.gateway.backends import BackendPool
from services.gateway.grpc_api import ChatServicer
from services.gateway.http_api import HttpApi
from services.gateway.metrics import GatewayMetrics
from services.gateway.openai_protocol import Limits
from services.gateway.orchestrator import Orchestrator, OrchestratorConfig

log = logging.getLogger("epd.gateway")


@dataclass(frozen=True)
class GatewayConfig:
    model: str
    encoders: tuple[str, ...]
    language: tuple[str, ...]
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 50071
    metrics_port: int | None = None
    api_key: str | None = None
    served_model_name: str | None = None
    limits: Limits = field(default_factory=Limits)
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)
    refresh_s: float = 2.0  # DNS re-resolution and health-check period
    grace_s: float = 20.0
    backend_tls: ClientTLS | None = None  # TLS to encoders and language replicas
    # TLS on both front doors, HTTP and gRPC (PEM files); `tls_ca` requires client certificates.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).resolve().name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = GatewayConfig
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
    parser.add_argument("--host", default=d.host, help="address to listen on")
    parser.add_argument("--http-port", type=int, default=d.http_port, help="OpenAI HTTP port")
    parser.add_argument("--grpc-port", type=int, default=d.grpc_port, help="gRPC Chat port")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="also serve Prometheus /metrics on this port (it is on HTTP too)",
    )
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
        help="directory file:// image URLs may read from (default: none)",
    )
    parser.add_argument("--max-images-per-request", type=int, default=Limits.max_images)
    parser.add_argument("--max-image-bytes", type=int, default=Limits.max_image_bytes)
    parser.add_argument(
        "--encode-timeout",
        type=float,
        default=OrchestratorConfig.encode_timeout_s,
        help="seconds one encoder gets before the image is retried on another",
    )
    parser.add_argument(
        "--grace-period",
        type=float,
        default=d.grace_s,
        help="seconds in-flight requests get to finish on SIGTERM",
    )
    tls = parser.add_argument_group("TLS on the HTTP and gRPC ports")
    tls.add_argument("--ssl-certfile", default=None, help="PEM certificate chain: serve HTTPS")
    tls.add_argument("--ssl-keyfile", default=None, help="PEM private key of --ssl-certfile")
    tls.add_argument(
        "--ssl-ca-certs", default=None, help="PEM CA bundle: require client certificates"
    )
    add_client_tls_arguments(parser, "backend-", "encoders and language replicas")


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    media = Path(args.allowed_local_media_path) if args.allowed_local_media_path else None
    return GatewayConfig(
        model=args.model,
        encoders=tuple(a for a in args.encoders.split(",") if a.strip()),
        language=tuple(a for a in args.language.split(",") if a.strip()),
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        limits=Limits(args.max_images_per_request, args.max_image_bytes, media),
        orchestrator=OrchestratorConfig(encode_timeout_s=args.encode_timeout),
        grace_s=args.grace_period,
        backend_tls=client_tls_from_args(args, "backend-"),
        tls_cert=args.ssl_certfile,
        tls_key=args.ssl_keyfile,
        tls_ca=args.ssl_ca_certs,
    )


def run(args: argparse.Namespace) -> int:
    asyncio.run(serve(config_from_args(args)))
    return 0


@dataclass
class GatewayService:
    cfg: GatewayConfig
    grpc: GrpcServer
    runner: web.AppRunner
    http_port: int
    pools: list[BackendPool]
    metrics: GatewayMetrics

    @property
    def base_url(self) -> str:
        scheme = "https" if self.cfg.tls_cert else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}/v1"

    async def stop(self, grace: float | None = None) -> None:
        await self.grpc.stop(grace)
        await self.runner.cleanup()
        for pool in self.pools:
            await pool.stop()


async def start(cfg: GatewayConfig, wait_s: float = 0.0) -> GatewayService:
    server_cfg = ServerConfig(
        host=cfg.host,
        port=cfg.grpc_port,
        metrics_port=cfg.metrics_port,
        grace_s=cfg.grace_s,
        tls_cert=cfg.tls_cert,
        tls_key=cfg.tls_key,
        tls_ca=cfg.tls_ca,
    )  # checks the TLS flags before anything starts
    model_cfg = ModelConfig.from_dir(cfg.model)
    tokenizer = ChatTokenizer(cfg.model)
    if model_cfg.is_multimodal and not cfg.encoders:
        log.warning("no --encoders given: requests with images will be refused")
    tls = cfg.backend_tls
    encoders = (
        BackendPool("encoder", cfg.encoders, cfg.refresh_s, tls=tls) if cfg.encoders else None
    )
    language = BackendPool("language", cfg.language, cfg.refresh_s, tls=tls)
    pools = [p for p in (encoders, language) if p is not None]
    for pool in pools:
        await pool.start()
    metrics = GatewayMetrics()
    orchestrator = Orchestrator(model_cfg, tokenizer, encoders, language, metrics, cfg.orchestrator)

    def ready() -> bool:
        return bool(language.healthy) and (encoders is None or bool(encoders.healthy))

    http = HttpApi(orchestrator, cfg.model_name, cfg.limits, cfg.api_key, ready)
    runner = web.AppRunner(http.app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.http_port, ssl_context=_ssl_context(cfg))
    await site.start()
    http_port = runner.addresses[0][1]
    service_name = gateway_pb2.DESCRIPTOR.services_by_name["Chat"].full_name
    grpc_server = GrpcServer(server_cfg, [service_name])
    gateway_pb2_grpc.add_ChatServicer_to_server(
        ChatServicer(orchestrator, cfg.model_name, cfg.limits, cfg.api_key), grpc_server.server
    )
    await grpc_server.start(metrics.registry)
    if wait_s:
        for pool in pools:
            await pool.wait_healthy(wait_s)
    if ready():
        await grpc_server.set_serving()
    log.info(
        "gateway for %s: HTTP :%d (OpenAI API), gRPC :%d",
        cfg.model_name,
        http_port,
        grpc_server.port,
    )
    return GatewayService(cfg, grpc_server, runner, http_port, pools, metrics)


def _ssl_context(cfg: GatewayConfig) -> ssl.SSLContext | None:
    """The HTTP side's TLS, from the same files as the gRPC side's."""
    if cfg.tls_cert is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    if cfg.tls_ca is not None:
        ctx.load_verify_locations(cfg.tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def serve(cfg: GatewayConfig) -> None:
    service = await start(cfg)

    async def keep_health() -> None:
        while True:  # SERVING once backends are there (they may come after the gateway)
            if all(p.healthy for p in service.pools):
                await service.grpc.set_serving()
                return
            await asyncio.sleep(service.cfg.refresh_s)

    task = asyncio.create_task(keep_health())

    async def shutdown() -> None:
        task.cancel()
        await service.runner.cleanup()
        for pool in service.pools:
            await pool.stop()

    await service.grpc.serve_until_signal(shutdown)
