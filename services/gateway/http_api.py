"""OpenAI-compatible HTTP API (aiohttp): /v1/chat/completions, /v1/models, /health, /metrics."""

from __future__ import annotations

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


class HttpApi:
    def __init__(
        self,
        orchestrator: Orchestrator,
        model_name: str,
        limits: Limits,
        api_key: str | None = None,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self.orchestrator, self.model_name, self.limits = orchestrator, model_name, limits
        self.api_key, self.ready = api_key, ready
        self.metrics = orchestrator.metrics
        self.app = web.Application(
            middlewares=[self._errors, self._auth], client_max_size=256 << 20
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
            return web.json_response(e.body(), status=e.status)
        except web.HTTPException as e:
            if e.status >= 400:
                body = ApiError(e.status, e.reason or "error").body()
                return web.json_response(body, status=e.status)
            raise

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
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "epd"}
        return web.json_response({"object": "list", "data": [card]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json(loads=json.loads)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"request body is not valid JSON: {e}") from None
        req = parse_chat_request(body, self.limits)
        if req.model != self.model_name:
            raise ApiError(404, f"The model `{req.model}` does not exist.", "model")
        self.metrics.in_flight.inc()
        try:
            if req.stream:
                response = await self._stream(request, req)
            else:
                response = await self._complete(req)
        finally:
            self.metrics.in_flight.dec()
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


async def _send(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")


def _timing_headers(final: Final) -> dict[str, str]:
    return {"X-Epd-Timings": json.dumps({k: round(v, 6) for k, v in final.timings.items()})}
