"""Bounded admission at the gateway: requests beyond --max-in-flight-requests are shed with 429
and Retry-After instead of queueing without bound, bodies beyond --max-request-body-bytes get
413, both with OpenAI's error body; the requests already admitted are unaffected."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp

from common.grpc_bootstrap import ServerConfig
from services.gateway.__main__ import GatewayConfig
from services.gateway.__main__ import start as start_gateway
from services.gateway.orchestrator import OrchestratorConfig
from services.language.__main__ import LanguageConfig
from services.language.__main__ import start as start_language
from services.language.engine.builder import EngineConfig


def test_overload_is_shed_with_429_and_big_bodies_get_413(tiny_model: Path) -> None:
    async def body() -> tuple[list[int], str | None, dict, int, dict, float]:
        language = await start_language(LanguageConfig(
            EngineConfig(str(tiny_model), kv_cache_bytes=16 << 20),
            ServerConfig(host="127.0.0.1", port=0, grace_s=1.0),
        ))  # fmt: skip
        gateway = await start_gateway(
            GatewayConfig(model=str(tiny_model), encoders=(), language=(language.address,),
                          server=ServerConfig(host="127.0.0.1", port=0), http_port=0,
                          orchestrator=OrchestratorConfig(max_in_flight=2),
                          max_body_bytes=64 << 10),
            wait_s=10,
        )  # fmt: skip
        url = f"{gateway.base_url}/chat/completions"
        chat = {"model": gateway.cfg.model_name, "max_tokens": 256, "ignore_eos": True,
                "messages": [{"role": "user", "content": "count"}]}  # fmt: skip
        try:
            async with aiohttp.ClientSession() as session:

                async def post(payload: bytes) -> tuple[int, dict, str | None]:
                    async with session.post(url, data=payload) as r:
                        return r.status, await r.json(), r.headers.get("Retry-After")

                results = await asyncio.gather(*(post(json.dumps(chat).encode())
                                                 for _ in range(6)))  # fmt: skip
                shed = next(r for r in results if r[0] == 429)
                big = {**chat, "messages": [{"role": "user", "content": "x" * (100 << 10)}]}
                status, error, _ = await post(json.dumps(big).encode())
                in_flight = gateway.orchestrator.in_flight
                rejected = gateway.metrics.registry.get_sample_value(
                    "epd_gateway_rejected_total", {"reason": "overloaded"}
                )
                return ([r[0] for r in results], shed[2], shed[1], status, error,
                        (in_flight, rejected))  # fmt: skip
        finally:
            await gateway.stop(0)
            await language.stop(0)

    statuses, retry_after, shed, big_status, big, (in_flight, rejected) = asyncio.run(body())
    assert sorted(statuses) == [200, 200, 429, 429, 429, 429]
    assert retry_after == "1" and "in flight" in shed["error"]["message"]
    assert shed["error"]["type"] == "rate_limit_error"
    assert big_status == 413 and big["error"]["message"]
    assert in_flight == 0 and rejected == 4
