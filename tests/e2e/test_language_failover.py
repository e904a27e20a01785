"""Failures are blamed on the role that caused them (real processes, the official client):

- a language replica that is dead, or dies while a Generate is in flight, is marked down and
  the request moves to another replica, its images encoded again;
- an encoder that dies after encoding an image but before the language replica pulled it is
  the encoder's fault: the image is encoded again on another encoder and the request retried on
  the same replica, which is never marked down.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai

from common.grpc_bootstrap import ServerConfig
from services.gateway.__main__ import GatewayConfig, GatewayService, start
from services.gateway.backends import rendezvous_weight
from services.gateway.media import content_hash
from tests.e2e.serving import EPD, wait_serving


def start_role(role: str, model: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    cmd = [EPD, role, "--model", str(model), "--host", "127.0.0.1", "--port", "0", *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        return proc, f"127.0.0.1:{wait_serving(proc, [], timeout=120)}"
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def start_language(model: Path) -> tuple[subprocess.Popen[str], str]:
    return start_role("language", model, "--kv-cache-bytes", str(16 << 20))


def start_encoder(model: Path) -> tuple[subprocess.Popen[str], str]:
    return start_role("encoder", model, "--transport", "grpc", "--pool-bytes", str(16 << 20))


@contextmanager
def processes(*starts: tuple[str, Path]) -> Iterator[list[tuple[subprocess.Popen[str], str]]]:
    procs: list[tuple[subprocess.Popen[str], str]] = []
    try:
        for role, model in starts:
            procs.append(start_encoder(model) if role == "encoder" else start_language(model))
        yield procs
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            proc.wait()


def gateway_config(model: Path, encoders: tuple[str, ...], language: tuple[str, ...]):
    # Health checks every 60 s: the gateway cannot learn of a death that way in time.
    return GatewayConfig(model=str(model), encoders=encoders, language=language,
                         server=ServerConfig(host="127.0.0.1", port=0), http_port=0,
                         refresh_s=60.0)  # fmt: skip


def metric(gateway: GatewayService, name: str, **labels: str) -> float:
    return gateway.metrics.registry.get_sample_value(name, labels) or 0.0


def image_message(data: bytes, text: str = "What is this?") -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def test_requests_move_off_a_dead_language_replica(tiny_model: Path) -> None:
    with processes(("language", tiny_model), ("language", tiny_model)) as procs:
        (dead, dead_addr), (_, live_addr) = procs
        cfg = gateway_config(tiny_model, (), (dead_addr, live_addr))

        async def body() -> tuple[list[str], float, float]:
            gateway = await start(cfg, wait_s=30)
            try:
                assert len(gateway.pools[0].healthy) == 2
                dead.send_signal(signal.SIGKILL)
                dead.wait(timeout=10)
                client = openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
                reasons = []
                retries = "epd_gateway_language_retries_total"
                # Each request picks a replica at random until one lands on the dead one.
                for _ in range(20):
                    reply = await asyncio.to_thread(
                        client.chat.completions.create,
                        model=cfg.model_name,
                        messages=[{"role": "user", "content": "hello"}],
                        max_tokens=3,
                    )
                    reasons.append(reply.choices[0].finish_reason)
                    if metric(gateway, retries, cause="unreachable"):
                        break
                down = metric(gateway, "epd_gateway_backends_marked_down_total", pool="language")
                return reasons, metric(gateway, retries, cause="unreachable"), down
            finally:
                await gateway.stop(0)

        reasons, retried, down = asyncio.run(body())
    assert retried == 1 and down == 1  # moved once; the dead replica is marked down after that
    assert all(r in ("stop", "length") for r in reasons)


def test_a_replica_dying_during_generate_moves_image_requests(tiny_model: Path, png) -> None:
    """Both replicas serve requests; then one stops answering (SIGSTOP) while image requests
    are in flight on it, and dies (SIGKILL): those requests start over on the other replica,
    their images encoded again, and every one succeeds."""
    starts = (("encoder", tiny_model), ("language", tiny_model), ("language", tiny_model))
    with processes(*starts) as procs:
        (_, enc_addr), (victim, victim_addr), (_, live_addr) = procs
        cfg = gateway_config(tiny_model, (enc_addr,), (victim_addr, live_addr))

        async def body() -> tuple[list[str], float, float, float]:
            gateway = await start(cfg, wait_s=30)
            client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)

            async def ask(i: int) -> str:
                reply = await client.chat.completions.create(
                    model=cfg.model_name, messages=image_message(png(64, 48, 900 + i)),
                    max_tokens=4, temperature=0,
                )  # fmt: skip
                return str(reply.choices[0].finish_reason)

            try:
                # Two at a time: the second goes to the replica with fewer outstanding, so
                # both replicas serve (and the victim's info is cached: no GetInfo later).
                earlier = await asyncio.gather(ask(0), ask(1))
                os.kill(victim.pid, signal.SIGSTOP)
                in_flight = [asyncio.create_task(ask(2 + i)) for i in range(4)]
                await asyncio.sleep(1.0)  # the victim holds two of them, unanswered
                victim.kill()
                reasons = [*earlier, *await asyncio.gather(*in_flight)]
                retries = metric(gateway, "epd_gateway_language_retries_total",
                                 cause="unreachable")  # fmt: skip
                down = metric(gateway, "epd_gateway_backends_marked_down_total", pool="language")
                images = metric(gateway, "epd_gateway_images_total", cache="miss") + metric(
                    gateway, "epd_gateway_images_total", cache="hit"
                )
                return reasons, retries, down, images
            finally:
                await client.close()
                await gateway.stop(0)

        reasons, retries, down, images = asyncio.run(body())
    assert len(reasons) == 6 and all(r in ("stop", "length") for r in reasons)
    # A request counts against its replica from the moment it is routed, so the four spread
    # two and two; the victim's two moved, each with its image encoded again.
    assert retries == 2 and down == 1
    assert images == 6 + retries


def test_an_encoder_dying_before_the_pull_is_not_the_replicas_fault(tiny_model: Path, png) -> None:
    """The only language replica is paused while an image request's image is encoded on encoder
    A; A is killed before the replica pulls the tensor. The replica reports an image fault (not
    a failure of its own): the gateway encodes the image again on encoder B and retries on the
    same replica. Before, the replica was marked down and the request got 503."""
    starts = (("encoder", tiny_model), ("encoder", tiny_model), ("language", tiny_model))
    with processes(*starts) as procs:
        (enc_a, addr_a), (_, addr_b), (lang, lang_addr) = procs
        image = next(
            img for img in (png(80, 60, 700 + i) for i in range(64))
            if rendezvous_weight(content_hash(img), addr_a)
            > rendezvous_weight(content_hash(img), addr_b)
        )  # fmt: skip
        cfg = gateway_config(tiny_model, (addr_a, addr_b), (lang_addr,))

        async def body() -> tuple[str, dict[str, float]]:
            gateway = await start(cfg, wait_s=30)
            client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
            try:
                await client.chat.completions.create(
                    model=cfg.model_name,
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=2,
                )  # fmt: skip  (the replica's info is cached from here on)
                os.kill(lang.pid, signal.SIGSTOP)
                task = asyncio.create_task(client.chat.completions.create(
                    model=cfg.model_name, messages=image_message(image), max_tokens=4,
                ))  # fmt: skip
                end = time.monotonic() + 30
                while not metric(gateway, "epd_gateway_images_total", cache="miss"):
                    assert time.monotonic() < end, "the image was never encoded"
                    await asyncio.sleep(0.02)
                enc_a.kill()  # encoded and published at A, not pulled yet
                enc_a.wait()
                os.kill(lang.pid, signal.SIGCONT)
                reply = await task
                counts = {
                    "image_retries": metric(gateway, "epd_gateway_image_retries_total",
                                            reason="producer_lost"),
                    "language_down": metric(gateway, "epd_gateway_backends_marked_down_total",
                                            pool="language"),
                    "encoder_down": metric(gateway, "epd_gateway_backends_marked_down_total",
                                           pool="encoder"),
                }  # fmt: skip
                return str(reply.choices[0].finish_reason), counts
            finally:
                await client.close()
                await gateway.stop(0)

        reason, counts = asyncio.run(body())
    assert reason in ("stop", "length")
    assert counts == {"image_retries": 1, "language_down": 0, "encoder_down": 1}
