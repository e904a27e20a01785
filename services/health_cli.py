"""`epd health ADDR`: ask a role's gRPC health service whether it is SERVING.

The container health check of every role (compose `healthcheck:`, and Kubernetes `exec` probes
where native gRPC probes cannot be used, e.g. with TLS). Exit status 0 when SERVING, 1 otherwise
(NOT_SERVING, unknown service, unreachable, timed out), always with one line on stdout saying why.
"""

from __future__ import annotations

import argparse

import grpc

from common.grpc_bootstrap import health_check
from common.tls import add_client_tls_arguments, client_tls_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="ADDR", help="HOST:PORT of the role's gRPC server")
    parser.add_argument(
        "--service", default="", help="health service name to check (default: the whole server)"
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the answer (default: 5)"
    )
    add_client_tls_arguments(parser, "", "a server started with --ssl-certfile")


def run(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be positive, got {args.timeout}")
    tls = client_tls_from_args(args, "")
    target = f"{args.address} ({args.service or 'server'})"
    try:
        status = health_check(args.address, args.service, args.timeout, tls)
    except grpc.RpcError as e:
        # grpc.Call and grpc.RpcError are one object at run time; the type stubs keep them apart.
        code = e.code().name if isinstance(e, grpc.Call) else "ERROR"
        details = e.details() if isinstance(e, grpc.Call) else str(e)
        print(f"{target}: {code}: {details}")
        return 1
    print(f"{target}: {status}")
    return 0 if status == "SERVING" else 1
