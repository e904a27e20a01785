"""A real checkpoint's context (262,144 tokens) on a replica whose KV cache holds far fewer:
max_model_len is computed once, advertised, and a request without max_tokens is served."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import grpc
import openai
import pytest

from common.grpc_bootstrap import ServerConfig
from common.rpc import gateway_pb2, gateway_pb2_grpc
from services.gateway.__main__ import GatewayConfig
from services.gateway.__main__ import start as start_gateway
from services.language.__main__ import LanguageConfig
from services.language.__main__ import start as start_language
from services.language.engine.builder import EngineConfig

KV_BYTES = 64 << 20  # the tiny model's K/V is 1 KiB per token in fp32: 65,536 tokens


@pytest.fixture(scope="module")
def long_context_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ctx") / "tiny-262k"
    shutil.copytree(tiny_model, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 262_144
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def language_config(model: Path, max_model_len: int | None = None) -> LanguageConfig:
    engine = EngineConfig(str(model), kv_cache_bytes=KV_BYTES, max_model_len=max_model_len)
    return LanguageConfig(engine, ServerConfig(host="127.0.0.1", port=0, grace_s=1.0))


def test_a_request_without_max_tokens_fits_what_the_cache_holds(long_context_model: Path) -> None:
    async def body() -> tuple[int, str, int, str, int]:
        language = await start_language(language_config(long_context_model))
        gateway = await start_gateway(
            GatewayConfig(model=str(long_context_model), encoders=(),
                          language=(language.address,),
                          server=ServerConfig(host="127.0.0.1", port=0), http_port=0),
            wait_s=10,
        )  # fmt: skip
        client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
        try:
            models = await client.models.list()
            max_len = models.model_dump()["data"][0]["max_model_len"]
            messages = [{"role": "user", "content": "Hello there"}]
            # The greedy first token (over gRPC, which reports token ids), then the same prompt
            # without max_tokens, stopping on that token: served, not refused.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.server.port}") as ch:
                chat = gateway_pb2_grpc.ChatStub(ch)
                request = gateway_pb2.ChatRequest(
                    messages=[gateway_pb2.Message(role="user",
                                                  content=[gateway_pb2.Part(text="Hello there")])],
                    max_tokens=1, temperature=0.0,
                )  # fmt: skip
                replies = [r async for r in chat.Complete(request)]
            first = replies[0].delta.token_ids[0]
            reply = await client.chat.completions.create(
                model=gateway.cfg.model_name, messages=messages, temperature=0,
                extra_body={"stop_token_ids": [first]},
            )  # fmt: skip
            with pytest.raises(openai.BadRequestError) as err:
                await client.chat.completions.create(
                    model=gateway.cfg.model_name, messages=messages, max_tokens=max_len
                )
            return (max_len, str(reply.choices[0].finish_reason),
                    reply.usage.completion_tokens if reply.usage else 0,
                    err.value.message, language.engine.max_model_len)  # fmt: skip
        finally:
            await client.close()
            await gateway.stop(0)
            await language.stop(0)

    max_len, finish, tokens, refused, engine_len = asyncio.run(body())
    assert max_len == engine_len == KV_BYTES // 1024
    assert finish == "stop" and tokens == 1
    assert f"maximum context length is {max_len} tokens" in refused


def test_a_max_model_len_the_cache_cannot_hold_fails_at_start_up(
    long_context_model: Path,
) -> None:
    with pytest.raises(ValueError, match="raise --kv-cache-bytes"):
        asyncio.run(start_language(language_config(long_context_model, 100_000)))
