"""TLS for our gRPC clients: the gateway to its backends, the language service to encoders'
TensorStore (grpc transport), `epd health`. Servers take `--ssl-certfile/--ssl-keyfile` (and
`--ssl-ca-certs` to require client certificates, see `grpc_bootstrap`); every client that dials
them takes the matching flags made here.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class ClientTLS:
    ca_certs: str  # PEM bundle of the CAs that signed the servers' certificates
    certfile: str | None = None  # PEM client certificate chain, for servers requiring mutual TLS
    keyfile: str | None = None  # PEM private key of `certfile`
    # The name servers' certificates are checked against, when it differs from the host dialled
    # (backends found through DNS are dialled by IP, e.g. "encoder" for dns:///encoder:50051).
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("a TLS client certificate and its key go together")
        for path in (self.ca_certs, self.certfile, self.keyfile):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS file not found: {path}")

    def credentials(self) -> grpc.ChannelCredentials:
        key = Path(self.keyfile).read_bytes() if self.keyfile else None
        cert = Path(self.certfile).read_bytes() if self.certfile else None
        return grpc.ssl_channel_credentials(Path(self.ca_certs).read_bytes(), key, cert)

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def channel(
    address: str, tls: ClientTLS | None, options: list[tuple[str, int | str]]
) -> grpc.Channel:
    """A blocking channel to `address`: TLS when `tls` is given, else plaintext."""
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.credentials(), options=[*options, *tls.options()])


def aio_channel(
    address: str, tls: ClientTLS | None, options: list[tuple[str, int | str]]
) -> grpc.aio.Channel:
    """`channel` for asyncio callers."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.credentials(), options=[*options, *tls.options()])


def add_client_tls_arguments(parser: argparse.ArgumentParser, prefix: str, peers: str) -> None:
    """`--{prefix}ssl-ca-certs`, `-certfile`, `-keyfile`, `-server-name` for dialling `peers`."""
    g = parser.add_argument_group(f"TLS to {peers}")
    g.add_argument(
        f"--{prefix}ssl-ca-certs",
        default=None,
        help=f"PEM CA bundle: connect to {peers} with TLS (default: plaintext)",
    )
    g.add_argument(
        f"--{prefix}ssl-certfile", default=None, help="PEM client certificate (mutual TLS)"
    )
    g.add_argument(f"--{prefix}ssl-keyfile", default=None, help="PEM private key of the certfile")
    g.add_argument(
        f"--{prefix}ssl-server-name",
        default=None,
        help="name to check server certificates against (default: the host dialled)",
    )


def client_tls_from_args(args: argparse.Namespace, prefix: str) -> ClientTLS | None:
    """The ClientTLS the flags of `add_client_tls_arguments(prefix=...)` describe, or None."""
    dest = prefix.replace("-", "_")
    ca, cert, key, name = (
        getattr(args, f"{dest}ssl_{field}")
        for field in ("ca_certs", "certfile", "keyfile", "server_name")
    )
    if (cert is None) != (key is None):
        raise ValueError(f"--{prefix}ssl-certfile and --{prefix}ssl-keyfile go together")
    if ca is None:
        if cert or key or name:
            raise ValueError(
                f"--{prefix}ssl-certfile/-keyfile/-server-name need --{prefix}ssl-ca-certs"
            )
        return None
    return ClientTLS(ca, cert, key, name)
