"""`epd health ADDR`, the compose health check: exit 0 only when the server says SERVING."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from pathlib import Path

import pytest

from common.grpc_bootstrap import GrpcServer, ServerConfig
from services.cli import main


def epd_health(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["health", *argv])
    return code, capsys.readouterr().out.strip()


def test_serving_not_serving_and_unknown_service(capsys: pytest.CaptureFixture[str]) -> None:
    async def body() -> list[tuple[int, str]]:
        server = GrpcServer(ServerConfig(host="127.0.0.1", port=0), ["epd.test.v1.Thing"])
        await server.start()
        address = f"127.0.0.1:{server.port}"
        try:
            # The CLI is blocking: run it off the loop that serves the server.
            check = lambda *a: asyncio.to_thread(epd_health, capsys, address, *a)  # noqa: E731
            results = [await check()]
            await server.set_serving()
            results += [await check(), await check("--service", "epd.test.v1.Thing")]
            results += [await check("--service", "no.such.Service")]
            return results
        finally:
            await server.stop(0)

    loading, serving, named, unknown = asyncio.run(body())
    assert loading[0] == 1 and loading[1].endswith("(server): NOT_SERVING"), loading
    assert serving == (0, serving[1]) and serving[1].endswith("(server): SERVING"), serving
    assert named[0] == 0 and "(epd.test.v1.Thing): SERVING" in named[1], named
    assert unknown[0] == 1 and "NOT_FOUND" in unknown[1], unknown
    for _, line in (loading, serving, named, unknown):
        assert "\n" not in line


def test_closed_port_fails_fast(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the with-block ends: nothing listens there
    code, out = epd_health(capsys, f"127.0.0.1:{port}", "--timeout", "2")
    assert code == 1 and ("UNAVAILABLE" in out or "DEADLINE_EXCEEDED" in out), out


def test_tls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip

    async def body() -> tuple[tuple[int, str], tuple[int, str]]:
        cfg = ServerConfig(host="127.0.0.1", port=0, tls_cert=str(cert), tls_key=str(key))
        server = GrpcServer(cfg, [])
        await server.start()
        await server.set_serving()
        address = f"127.0.0.1:{server.port}"
        try:
            tls = await asyncio.to_thread(epd_health, capsys, address, "--ssl-ca-certs", str(cert))
            plain = await asyncio.to_thread(epd_health, capsys, address, "--timeout", "2")
            return tls, plain
        finally:
            await server.stop(0)

    tls, plain = asyncio.run(body())
    assert tls[0] == 0 and tls[1].endswith("SERVING"), tls
    assert plain[0] == 1, plain  # a plaintext check of a TLS server is not healthy


def test_bad_flags_are_user_errors() -> None:
    with pytest.raises(ValueError, match="--ssl-certfile and --ssl-keyfile go together"):
        main(["health", "127.0.0.1:1", "--ssl-ca-certs", "ca.pem", "--ssl-certfile", "c.pem"])
    with pytest.raises(SystemExit):
        main(["health"])  # ADDR is required
