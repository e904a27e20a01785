"""Shared gRPC server bootstrap: aio server, health, reflection, TLS, metrics, graceful drain.

Every role serves the same way:

- `grpc.health.v1` reports NOT_SERVING until the role has loaded its weights and run a warm-up,
  then SERVING; on SIGTERM it flips back to NOT_SERVING (load balancers stop routing) and the
  role drains (`common.lifecycle`: one lifecycle for every role);
- server reflection, so grpcurl-style tools discover the API;
- `grpc.max_connection_age_ms`, so clients reconnect now and then and DNS-based load balancing
  picks up new replicas;
- message size limits set deliberately (bulk tensors never travel as one message);
- optional TLS (mutual when a CA is given), from certificate files;
- Prometheus `/metrics` over HTTP on its own port.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from common.tls import ClientTLS
from common.tls import channel as tls_channel

log = logging.getLogger(__name__)

MIB = 1 << 20


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 0  # 0 = any free port
    metrics_port: int | None = None  # None = no /metrics endpoint
    max_message_bytes: int = 16 * MIB
    max_connection_age_s: float = 300.0
    grace_s: float = 20.0  # drain time on SIGTERM; keep below the pod's termination grace
    tls_cert: str | None = None  # PEM server certificate chain
    tls_key: str | None = None  # PEM private key
    tls_ca: str | None = None  # PEM CA bundle: when set, clients must present a certificate

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("tls_ca needs tls_cert and tls_key")


class GrpcServer:
    def __init__(self, cfg: ServerConfig, service_names: Sequence[str]) -> None:
        self.cfg = cfg
        self.service_names = list(service_names)
        age_ms = int(cfg.max_connection_age_s * 1000)
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_connection_age_ms", age_ms),
                ("grpc.max_connection_age_grace_ms", int(cfg.grace_s * 1000)),
                ("grpc.so_reuseport", 0),  # a port in use is an error, not a silent share
            ]
        )
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME],
            self.server,
        )  # fmt: skip
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert:
            self.port = self.server.add_secure_port(address, _credentials(cfg))
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        self.metrics_port: int | None = None
        self._httpd: Any = None

    async def start(self, registry: CollectorRegistry | None = None) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        if self.cfg.metrics_port is not None and registry is not None:
            self._httpd, _ = start_http_server(
                self.cfg.metrics_port, addr=self.cfg.host, registry=registry
            )
            self.metrics_port = self._httpd.server_port
        log.info("gRPC listening on %s:%d%s", self.cfg.host, self.port,
                 f", metrics on :{self.metrics_port}" if self.metrics_port else "")  # fmt: skip

    async def set_serving(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)
        log.info("SERVING %s", ", ".join(self.service_names))

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight calls finish within the grace period."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.cfg.grace_s if grace is None else grace)
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    async def _set_all(self, status: int) -> None:
        for name in ["", *self.service_names]:
            await self.health.set(name, status)


def _credentials(cfg: ServerConfig) -> grpc.ServerCredentials:
    assert cfg.tls_cert is not None and cfg.tls_key is not None  # checked in __post_init__
    pair = [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())]
    if cfg.tls_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(
        pair, root_certificates=Path(cfg.tls_ca).read_bytes(), require_client_auth=True
    )


def add_server_arguments(
    parser: argparse.ArgumentParser,
    default_port: int,
    port_flags: tuple[str, ...] = ("--port",),
    port_help: str = "gRPC port (0 = any free)",
) -> None:
    """The flags every role shares (named as vLLM's where the meaning is the same). The gateway
    passes its HTTP port's flags (`--port`, as vLLM's, and `--http-port`)."""
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=ServerConfig.host, help="address to listen on")
    g.add_argument(*port_flags, dest="port", type=int, default=default_port, help=port_help)
    g.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics on this port (0 = any free; default: off)",
    )
    g.add_argument(
        "--grace-period",
        type=float,
        default=ServerConfig.grace_s,
        help="seconds in-flight calls get to finish on SIGTERM",
    )
    g.add_argument("--ssl-certfile", default=None, help="PEM certificate chain: serve TLS")
    g.add_argument("--ssl-keyfile", default=None, help="PEM private key of --ssl-certfile")
    g.add_argument(
        "--ssl-ca-certs", default=None, help="PEM CA bundle: require client certificates"
    )


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        grace_s=args.grace_period,
        tls_cert=args.ssl_certfile,
        tls_key=args.ssl_keyfile,
        tls_ca=args.ssl_ca_certs,
    )


def health_check(
    address: str, service: str = "", timeout: float = 5.0, tls: ClientTLS | None = None
) -> str:
    """Status of `service` at `address` ("SERVING", "NOT_SERVING", ...); raises grpc.RpcError."""
    with tls_channel(address, tls, []) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
