"""A language replica dies: the gateway moves requests that had not started to another replica,
so no user sees the failure (before its health checks notice it)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import openai

from services.gateway.__main__ import GatewayConfig, start
from tests.e2e.serving import EPD, wait_serving


def start_language(model: Path) -> tuple[subprocess.Popen[str], str]:
    cmd = [EPD, "language", "--model", str(model), "--host", "127.0.0.1", "--port", "0",
           "--kv-cache-bytes", str(16 << 20)]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        return proc, f"127.0.0.1:{wait_serving(proc, [], timeout=120)}"
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def test_requests_move_off_a_dead_language_replica(tiny_model: Path) -> None:
    procs = []
    try:
        for _ in range(2):
            procs.append(start_language(tiny_model))
        (dead, dead_addr), (_, live_addr) = procs
        # Health checks every 60 s: the gateway cannot learn of the death that way in time.
        cfg = GatewayConfig(model=str(tiny_model), encoders=(), language=(dead_addr, live_addr),
                            host="127.0.0.1", http_port=0, grpc_port=0, refresh_s=60.0)  # fmt: skip

        async def body() -> tuple[list[str], float]:
            gateway = await start(cfg, wait_s=30)
            try:
                assert len(gateway.pools[0].healthy) == 2
                dead.send_signal(signal.SIGKILL)
                dead.wait(timeout=10)
                client = openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
                reasons = []

                def retries() -> float:
                    name = "epd_gateway_language_retries_total"
                    return gateway.metrics.registry.get_sample_value(name) or 0.0

                # Each request picks a replica at random until one lands on the dead one.
                for _ in range(20):
                    reply = await asyncio.to_thread(
                        client.chat.completions.create,
                        model=cfg.model_name,
                        messages=[{"role": "user", "content": "hello"}],
                        max_tokens=3,
                    )
                    reasons.append(reply.choices[0].finish_reason)
                    if retries():
                        break
                return reasons, retries()
            finally:
                await gateway.stop(0)

        reasons, retried = asyncio.run(body())
        assert retried == 1  # moved once; the dead replica is marked down after that
        assert all(r in ("stop", "length") for r in reasons)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
