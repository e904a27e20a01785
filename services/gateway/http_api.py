"""OpenAI-compatible HTTP API (aiohttp): /v1/chat/completions, /v1/models, /health, /metrics.

Bounded on the way in: bodies larger than `max_body_bytes` get 413 before they are read in full,
requests beyond the orchestrator's in-flight bound get 429 with Retry-After, and a large body is
decoded (JSON, base64 images, their hashes and headers) off the event loop, so one big request
never stalls the others' streams. Every error is OpenAI's JSON error body with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.gateway.openai_protocol import (
    ApiError,
    ChatRequest,
    Limits,
    chunk,
    completion_response,
    parse_chat_request,
    usage_chunk,
    usage_json,
)
from services.gateway.orchestrator import Delta, Final, Orchestrator

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DEFAULT_MAX_BODY_BYTES = 128 << 20
_PARSE_INLINE_BYTES = 64 * 1024  # larger bodies are parsed off the event loop


class HttpApi:
    def __init__(
        self,
        orchestrator: Orchestrator,
        model_name: str,
        limits: Limits,
        api_key: str | None = None,
        ready: Callable[[], bool] = lambda: True,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.orchestrator, self.model_name, self.limits = orchestrator, model_name, limits
        self.api_key, self.ready = api_key, ready
        self.metrics = orchestrator.metrics
        self.app = web.Application(
            middlewares=[self._errors, self._auth], client_max_size=max_body_bytes
        )
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/metrics", self.prometheus)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as e:
            if request.path == "/v1/chat/completions":
                self.metrics.requests.labels(str(e.status)).inc()
            return error_response(e)
        except web.HTTPException as e:
            if e.status >= 400:
                if e.status == 413:
                    self.metrics.rejected.labels("body_too_large").inc()
                return error_response(ApiError(e.status, e.reason or "error"))
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:  # a bug: still an OpenAI error body, and the stack trace in the log
            log.exception("unexpected error serving %s %s", request.method, request.path)
            return error_response(ApiError(500, "internal error; see the gateway's log"))

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.api_key and request.path != "/health":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)")
        return await handler(request)

    async def health(self, request: web.Request) -> web.Response:
        if self.ready():
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "unavailable"}, status=503)

    async def prometheus(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        card: dict[str, Any] = {"id": self.model_name, "object": "model", "created": 0,
                                "owned_by": "epd", "root": self.model_name}  # fmt: skip
        max_len = await self.orchestrator.max_model_len()
        if max_len is not None:
            card["max_model_len"] = max_len
        return web.json_response({"object": "list", "data": [card]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        with self.orchestrator.admit():
            raw = await request.read()  # 413 beyond client_max_size
            if len(raw) > _PARSE_INLINE_BYTES:
                req = await asyncio.to_thread(parse_body, raw, self.limits)
            else:
                req = parse_body(raw, self.limits)
            if req.model != self.model_name:
                raise ApiError(404, f"The model `{req.model}` does not exist.", "model")
            if req.stream:
                response = await self._stream(request, req)
            else:
                response = await self._complete(req)
        self.metrics.requests.labels(str(response.status)).inc()
        return response

    async def _complete(self, req: ChatRequest) -> web.Response:
        parts: list[str] = []
        logprobs: list[dict[str, Any]] = []
        final: Final | None = None
        async for item in self.orchestrator.chat(req):
            if isinstance(item, Delta):
                parts.append(item.text)
                logprobs += item.logprobs
            else:
                final = item
        assert final is not None
        usage = usage_json(final.prompt_tokens, final.completion_tokens, final.cached_tokens)
        body = completion_response(
            req, "".join(parts), final.finish_reason, usage, logprobs if req.logprobs else None
        )
        return web.json_response(body, headers=_timing_headers(final))

    async def _stream(self, request: web.Request, req: ChatRequest) -> web.StreamResponse:
        items = self.orchestrator.chat(req)
        # Errors before the first item (bad image, no backend) still get a proper status.
        first = await anext(items)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        await _send(response, chunk(req, {"role": "assistant", "content": ""}))
        try:
            item: Delta | Final | None = first
            while item is not None:
                await self._send_item(response, req, item)
                item = await anext(items, None)
        except ApiError as e:  # after the headers: report in-band, as vLLM does
            await _send(response, e.body())
        finally:
            await items.aclose()  # cancels the generation downstream if the client left
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _send_item(self, response: web.StreamResponse, req: ChatRequest, item: Any) -> None:
        if isinstance(item, Delta):
            if item.text or (req.logprobs and item.logprobs):
                lp = item.logprobs if req.logprobs else None
                await _send(response, chunk(req, {"content": item.text}, None, lp))
            return
        await _send(response, chunk(req, {}, item.finish_reason))
        if req.include_usage:
            usage = usage_json(item.prompt_tokens, item.completion_tokens, item.cached_tokens)
            await _send(response, usage_chunk(req, usage))


def parse_body(raw: bytes, limits: Limits) -> ChatRequest:
    """JSON bytes -> a validated ChatRequest (images read, hashed and checked)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    return parse_chat_request(body, limits)


def error_response(e: ApiError) -> web.Response:
    headers = {"Retry-After": str(max(1, round(e.retry_after)))} if e.retry_after else None
    return web.json_response(e.body(), status=e.status, headers=headers)


async def _send(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")


def _timing_headers(final: Final) -> dict[str, str]:
    return {"X-Epd-Timings": json.dumps({k: round(v, 6) for k, v in final.timings.items()})}
