"""Mutual TLS end to end: an encoder requiring client certificates, reached by the gateway's
backend pool and by a grpc-transport consumer (what the language service runs) with the client
flags; plaintext or certificate-less clients are refused."""

from __future__ import annotations

import argparse
import asyncio
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.grpc_bootstrap import ServerConfig, health_check
from common.rpc import encoder_pb2, encoder_pb2_grpc
from common.tls import ClientTLS, add_client_tls_arguments, client_tls_from_args
from common.transfer import Consumer, ProducerLostError, TransferConfig, host_id
from services.encoder.__main__ import EncoderServiceConfig, start
from services.encoder.encoder import EncoderConfig
from services.gateway.__main__ import GatewayConfig, add_arguments, config_from_args
from services.gateway.__main__ import start as start_gateway
from services.gateway.backends import BackendPool


def test_flags_build_client_tls(pki: dict[str, Path]) -> None:
    parser = argparse.ArgumentParser()
    add_client_tls_arguments(parser, "backend-", "backends")
    ca, cert, key = (str(pki[n]) for n in ("ca.crt", "client.crt", "client.key"))
    assert client_tls_from_args(parser.parse_args([]), "backend-") is None
    args = ["--backend-ssl-ca-certs", ca, "--backend-ssl-certfile", cert]
    args += ["--backend-ssl-keyfile", key, "--backend-ssl-server-name", "encoder"]
    tls = client_tls_from_args(parser.parse_args(args), "backend-")
    assert tls == ClientTLS(ca, cert, key, "encoder")
    assert tls.options() == [("grpc.ssl_target_name_override", "encoder")]
    with pytest.raises(ValueError, match="--backend-ssl-certfile and --backend-ssl-keyfile go"):
        client_tls_from_args(parser.parse_args(["--backend-ssl-certfile", cert]), "backend-")
    with pytest.raises(ValueError, match="need --backend-ssl-ca-certs"):
        client_tls_from_args(parser.parse_args(["--backend-ssl-server-name", "x"]), "backend-")
    with pytest.raises(ValueError, match="go together"):
        ClientTLS(ca, certfile=cert)
    with pytest.raises(ValueError, match="not found: /no/such.pem"):
        ClientTLS("/no/such.pem")


def test_encoder_over_mutual_tls(tiny_model: Path, pki: dict[str, Path], png) -> None:
    ca, cert, key = (str(pki[n]) for n in ("ca.crt", "client.crt", "client.key"))
    mutual = ClientTLS(ca, cert, key)
    cfg = EncoderServiceConfig(
        model=str(tiny_model),
        server=ServerConfig(
            host="127.0.0.1",
            port=0,
            grace_s=1.0,
            tls_cert=str(pki["server.crt"]),
            tls_key=str(pki["server.key"]),
            tls_ca=ca,
        ),
        transfer=TransferConfig(backend="grpc", pool_bytes=4 << 20),
        encoder=EncoderConfig(cache_bytes=0),
    )

    async def body() -> None:
        service = await start(cfg)
        address = service.address  # 127.0.0.1: in the server certificate's names
        pools = [
            BackendPool("encoder", [address], refresh_s=0.2, tls=tls)
            for tls in (mutual, ClientTLS(ca), ClientTLS(ca, cert, key, server_name="localhost"))
        ]
        try:
            for pool in pools:
                await pool.start()
            with_cert, without_cert, by_name = pools
            assert await with_cert.wait_healthy(10) and await by_name.wait_healthy(10)
            assert not await without_cert.wait_healthy(1.0)  # the server wants a certificate
            backend = with_cert.backends[address]
            stub = encoder_pb2_grpc.EncoderStub(backend.channel)
            request = encoder_pb2.EncodeRequest(
                images=[encoder_pb2.ImageData(data=png(64, 64))], consumer_host=host_id()
            )
            reply = await stub.Encode(request, timeout=30)
            handle = reply.images[0].handle
            assert handle.WhichOneof("location") == "grpc"
            with Consumer() as plaintext, pytest.raises(ProducerLostError):
                await plaintext.fetch_async(handle)
            with Consumer(TransferConfig(client_tls=mutual)) as consumer:
                tensor = await consumer.fetch_async(handle)
            assert tensor.shape[0] == reply.images[0].n_tokens
            status = await asyncio.to_thread(health_check, address, "", 5.0, mutual)
            assert status == "SERVING"
            health = health_pb2_grpc.HealthStub(by_name.backends[address].channel)
            assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == 1
        finally:
            for pool in pools:
                await pool.stop()
            await service.stop(0)

    asyncio.run(body())


def test_gateway_front_doors_speak_tls(tiny_model: Path, pki: dict[str, Path]) -> None:
    ca, cert, key = (str(pki[n]) for n in ("ca.crt", "client.crt", "client.key"))
    cfg = GatewayConfig(
        model=str(tiny_model),
        encoders=(),
        language=("127.0.0.1:1",),  # nothing there: the gateway is up but not ready
        server=ServerConfig(
            host="127.0.0.1",
            port=0,
            tls_cert=str(pki["server.crt"]),
            tls_key=str(pki["server.key"]),
            tls_ca=ca,  # mutual
        ),
        http_port=0,
    )

    def get_health(url: str, client_cert: bool) -> int:
        ctx = ssl.create_default_context(cafile=ca)
        if client_cert:
            ctx.load_cert_chain(cert, key)
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=10) as reply:
                return int(reply.status)
        except urllib.error.HTTPError as e:
            return e.code

    async def body() -> None:
        service = await start_gateway(cfg)
        try:
            assert service.base_url.startswith("https://")
            health = service.base_url.removesuffix("/v1") + "/health"
            # Up over HTTPS (503: no language replica is healthy yet).
            assert await asyncio.to_thread(get_health, health, True) == 503
            with pytest.raises(OSError):  # no client certificate: refused (SSL error or reset)
                await asyncio.to_thread(get_health, health, False)
            with pytest.raises(OSError):  # plaintext HTTP: refused
                await asyncio.to_thread(urllib.request.urlopen, health.replace("https", "http"))
            grpc_address = f"127.0.0.1:{service.server.port}"
            status = await asyncio.to_thread(
                health_check, grpc_address, "", 5.0, ClientTLS(ca, cert, key)
            )
            assert status == "NOT_SERVING"
        finally:
            await service.stop(0)

    asyncio.run(body())


def test_gateway_refuses_half_tls_config(tiny_model: Path, pki: dict[str, Path]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", str(tiny_model), "--language", "127.0.0.1:1",
                              "--ssl-certfile", str(pki["server.crt"])])  # fmt: skip
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        config_from_args(args)
