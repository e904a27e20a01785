"""`epd health ADDR`: ask a role's gRPC health service whether it is SERVING.

The container health check of every role (compose `healthcheck:`, and Kubernetes `exec` probes
where native gRPC probes cannot be used, e.g. with TLS). Exit status 0 when SERVING, 1 otherwise
(NOT_SERVING, unknown service, unreachable, timed out), always with one line on stdout saying why.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.grpc_bootstrap import health_check


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="ADDR", help="HOST:PORT of the role's gRPC server")
    parser.add_argument(
        "--service", default="", help="health service name to check (default: the whole server)"
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the answer (default: 5)"
    )
    tls = parser.add_argument_group("TLS (for servers started with --ssl-certfile)")
    tls.add_argument("--ssl-ca-certs", default=None, help="PEM CA bundle: connect with TLS")
    tls.add_argument("--ssl-certfile", default=None, help="PEM client certificate (mutual TLS)")
    tls.add_argument("--ssl-keyfile", default=None, help="PEM private key of --ssl-certfile")


def run(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be positive, got {args.timeout}")
    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        raise ValueError("--ssl-certfile and --ssl-keyfile go together")
    target = f"{args.address} ({args.service or 'server'})"
    try:
        if args.ssl_ca_certs is None:
            status = health_check(args.address, args.service, args.timeout)
        else:
            status = _tls_health_check(args)
    except grpc.RpcError as e:
        # grpc.Call and grpc.RpcError are one object at run time; the type stubs keep them apart.
        code = e.code().name if isinstance(e, grpc.Call) else "ERROR"
        details = e.details() if isinstance(e, grpc.Call) else str(e)
        print(f"{target}: {code}: {details}")
        return 1
    print(f"{target}: {status}")
    return 0 if status == "SERVING" else 1


def _tls_health_check(args: argparse.Namespace) -> str:
    """`health_check` over a TLS channel (mutual when a client certificate is given)."""
    key = Path(args.ssl_keyfile).read_bytes() if args.ssl_keyfile else None
    cert = Path(args.ssl_certfile).read_bytes() if args.ssl_certfile else None
    creds = grpc.ssl_channel_credentials(Path(args.ssl_ca_certs).read_bytes(), key, cert)
    with grpc.secure_channel(args.address, creds) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=args.service)
        reply = stub.Check(request, timeout=args.timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
