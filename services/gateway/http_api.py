"""OpenAI-compatible HTTP API (aiohttp): /v1/chat/completions, /v1/completions, /v1/models,
/tokenize, /detokenize (vLLM's), /health, /metrics.

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
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.contract import SamplingParams
from services.gateway.choices import ChoiceOutput
from services.gateway.completions import (
    ChoiceText,
    CompletionRequest,
    completion_json,
    parse_completion_request,
)
from services.gateway.openai_protocol import (
    ApiError,
    ChatRequest,
    Limits,
    chat_choice,
    chat_response,
    chunk,
    parse_chat_request,
    usage_chunk,
    usage_json,
)
from services.gateway.orchestrator import Delta, Final, Orchestrator

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DEFAULT_MAX_BODY_BYTES = 128 << 20
_GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
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
        self.reasoning_parser = orchestrator.options.reasoning_parser
        self.metrics = orchestrator.metrics
        self.app = web.Application(
            middlewares=[self._errors, self._auth], client_max_size=max_body_bytes
        )
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_post("/tokenize", self.tokenize)
        self.app.router.add_post("/detokenize", self.detokenize)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/metrics", self.prometheus)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as e:
            if request.path in _GENERATION_PATHS:
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
            self._check_model(req.model)
            if req.stream:
                response = await self._stream(request, req)
            else:
                response = await self._complete(req)
        self.metrics.requests.labels(str(response.status)).inc()
        return response

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"The model `{model}` does not exist.", "model")

    async def _complete(self, req: ChatRequest) -> web.Response:
        outs: dict[int, ChoiceOutput] = {}
        logprobs: dict[int, list[dict[str, Any]]] = {}
        finals: dict[int, Final] = {}
        async for item in self.orchestrator.chat(req):
            out = self._output(outs, req, item.index)
            if isinstance(item, Delta):
                out.feed(item.text)
                logprobs.setdefault(item.index, []).extend(item.logprobs)
            else:
                out.finish()
                finals[item.index] = item
        choices = [
            chat_choice(i, outs[i].message(), outs[i].finish_reason(f.finish_reason),
                        logprobs.get(i, []) if req.logprobs else None)
            for i, f in sorted(finals.items())
        ]  # fmt: skip
        body = chat_response(req, choices, _usage(list(finals.values())))
        return web.json_response(body, headers=_timing_headers(finals[0]))

    def _output(self, outs: dict[int, ChoiceOutput], req: ChatRequest, i: int) -> ChoiceOutput:
        if i not in outs:  # made on the first item: the prompt (its text) is rendered by then
            outs[i] = ChoiceOutput(req, self.reasoning_parser)
        return outs[i]

    async def _stream(self, request: web.Request, req: ChatRequest) -> web.StreamResponse:
        items = self.orchestrator.chat(req)
        # Errors before the first item (bad image, no backend) still get a proper status.
        first = await anext(items)
        response = await _open_stream(request)
        for i in range(req.params.n):
            await _send(response, chunk(req, {"role": "assistant", "content": ""}, index=i))
        outs: dict[int, ChoiceOutput] = {}
        finals: list[Final] = []
        try:
            item: Delta | Final | None = first
            while item is not None:
                out = self._output(outs, req, item.index)
                if isinstance(item, Delta):
                    await self._send_delta(response, req, item, out.feed(item.text))
                else:
                    await self._send_delta(response, req, Delta("", [], index=item.index),
                                           out.finish())  # fmt: skip
                    reason = out.finish_reason(item.finish_reason)
                    await _send(response, chunk(req, {}, reason, None, item.index))
                    finals.append(item)
                item = await anext(items, None)
            if req.include_usage:
                await _send(response, usage_chunk(req, _usage(finals)))
        except ApiError as e:  # after the headers: report in-band, as vLLM does
            await _send(response, e.body())
        finally:
            await items.aclose()  # cancels the generation downstream if the client left
        await _close_stream(response)
        return response

    async def _send_delta(
        self, response: web.StreamResponse, req: ChatRequest, item: Delta, pieces: list[dict]
    ) -> None:
        lp = item.logprobs if req.logprobs and item.logprobs else None
        if not pieces and lp:
            pieces = [{"content": ""}]
        for k, piece in enumerate(pieces):
            await _send(response, chunk(req, piece, None, lp if k == 0 else None, item.index))

    # ---- /v1/completions ----

    async def completions(self, request: web.Request) -> web.StreamResponse:
        with self.orchestrator.admit():
            raw = await request.read()
            body = await _json_off_loop(raw) if len(raw) > _PARSE_INLINE_BYTES else _json(raw)
            creq = parse_completion_request(body)
            self._check_model(creq.model)
            items = _merge([self.orchestrator.chat(p) for p in creq.prompts])
            first = await anext(items)  # errors before anything was generated: a status
            if creq.stream:
                response: web.StreamResponse = await self._stream_completion(
                    request, creq, items, first
                )
            else:
                response = await self._complete_completion(creq, items, first)
        self.metrics.requests.labels(str(response.status)).inc()
        return response

    async def _complete_completion(
        self, creq: CompletionRequest, items: AsyncIterator[tuple[int, Delta | Final]],
        first: tuple[int, Delta | Final],
    ) -> web.Response:  # fmt: skip
        texts: dict[int, ChoiceText] = {}
        finals: dict[int, list[Final]] = {}
        prompt_lps: dict[int, list[dict[str, Any]]] = {}
        pending: tuple[int, Delta | Final] | None = first
        while pending is not None:
            p, item = pending
            choice = self._choice(creq, texts, prompt_lps, p, item)
            if isinstance(item, Delta):
                choice.add(item.text, item.logprobs if creq.logprobs is not None else None)
            else:
                choice.finish_reason = item.finish_reason
                finals.setdefault(p, []).append(item)
            pending = await anext(items, None)
        choices = [texts[i].json(creq.logprobs is not None) for i in sorted(texts)]
        return web.json_response(completion_json(creq, choices, _batch_usage(finals)))

    def _choice(
        self,
        creq: CompletionRequest,
        texts: dict[int, ChoiceText],
        prompt_lps: dict[int, list[dict[str, Any]]],
        p: int,
        item: Delta | Final,
    ) -> ChoiceText:
        """The choice `item` belongs to (prompt p, sequence item.index); made with its echo."""
        if isinstance(item, Delta) and item.prompt_logprobs is not None:
            prompt_lps[p] = item.prompt_logprobs
        n = creq.prompts[p].params.n
        index = p * n + item.index
        if index not in texts:
            choice = texts[index] = ChoiceText(index)
            if creq.echo:
                self._echo(creq, choice, p, prompt_lps.get(p, []))
        return texts[index]

    def _echo(self, creq: CompletionRequest, choice: ChoiceText, p: int, lps: list) -> None:
        req = creq.prompts[p]
        ids = req.prompt_ids if req.prompt_ids is not None else None
        text = req.prompt if ids is None else self.orchestrator.decode_prompt(ids)
        if creq.logprobs is None:
            choice.add(text, None)
            return
        if ids is not None:
            first = self.orchestrator.decode_prompt(ids[:1])
        else:  # a text prompt: its first token is the text before entry 0's
            first = text[: len(text) - sum(len(e["token"]) for e in lps)]
        head: dict[str, Any] = {"token": first, "logprob": None, "top_logprobs": []}
        choice.text += text
        choice.add_logprobs([head, *lps], 0)

    async def _stream_completion(
        self, request: web.Request, creq: CompletionRequest,
        items: AsyncGenerator[tuple[int, Delta | Final], None], first: tuple[int, Delta | Final],
    ) -> web.StreamResponse:  # fmt: skip
        response = await _open_stream(request)
        texts: dict[int, ChoiceText] = {}
        finals: dict[int, list[Final]] = {}
        prompt_lps: dict[int, list[dict[str, Any]]] = {}
        want_lp = creq.logprobs is not None
        try:
            pending: tuple[int, Delta | Final] | None = first
            while pending is not None:
                p, item = pending
                fresh = (p * creq.prompts[p].params.n + item.index) not in texts
                choice = self._choice(creq, texts, prompt_lps, p, item)
                if fresh and creq.echo:
                    await _send(response, completion_json(creq, [choice.json(want_lp)], None))
                if isinstance(item, Delta):
                    part = choice.add(item.text, item.logprobs if want_lp else None)
                    if item.text or part:
                        c = {"index": choice.index, "text": item.text, "logprobs": part,
                             "finish_reason": None}  # fmt: skip
                        await _send(response, completion_json(creq, [c], None))
                else:
                    finals.setdefault(p, []).append(item)
                    c = {"index": choice.index, "text": "", "logprobs": None,
                         "finish_reason": item.finish_reason}  # fmt: skip
                    await _send(response, completion_json(creq, [c], None))
                pending = await anext(items, None)
            if creq.include_usage:
                await _send(response, completion_json(creq, [], _batch_usage(finals)))
        except ApiError as e:
            await _send(response, e.body())
        finally:
            await items.aclose()
        await _close_stream(response)
        return response

    # ---- /tokenize, /detokenize ----

    async def tokenize(self, request: web.Request) -> web.Response:
        body = _json(await request.read())
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        self._check_model(body.get("model"))
        for name in ("add_special_tokens", "return_token_strs"):
            if body.get(name) is not None and not isinstance(body[name], bool):
                raise ApiError(400, f"{name} must be a boolean", name)
        if "messages" in body:
            req = parse_chat_request({**body, "model": self.model_name}, self.limits)
        elif isinstance(body.get("prompt"), str):
            req = ChatRequest(self.model_name, [], [], SamplingParams(), prompt=body["prompt"])
            if not req.prompt:
                return web.json_response(await self._tokens_json([], body))
        else:
            raise ApiError(400, "tokenize takes a prompt (string) or messages", "prompt")
        ids = await self.orchestrator.tokenize(req)
        return web.json_response(await self._tokens_json(ids, body))

    async def _tokens_json(self, ids: list[int], body: dict[str, Any]) -> dict[str, Any]:
        strs = None
        if body.get("return_token_strs"):
            strs = [self.orchestrator.decode_prompt([t]) for t in ids]
        max_len = await self.orchestrator.max_model_len()
        return {"count": len(ids), "max_model_len": max_len, "tokens": ids, "token_strs": strs}

    async def detokenize(self, request: web.Request) -> web.Response:
        body = _json(await request.read())
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        self._check_model(body.get("model"))
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids
        ):
            raise ApiError(400, "tokens must be a list of token ids", "tokens")
        return web.json_response({"prompt": self.orchestrator.detokenize(ids)})


def parse_body(raw: bytes, limits: Limits) -> ChatRequest:
    """JSON bytes -> a validated ChatRequest (images read, hashed and checked)."""
    return parse_chat_request(_json(raw), limits)


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None


async def _json_off_loop(raw: bytes) -> Any:
    return await asyncio.to_thread(_json, raw)


async def _merge(
    gens: list[AsyncGenerator[Delta | Final, None]],
) -> AsyncGenerator[tuple[int, Delta | Final], None]:
    """The items of several generations as they come, each tagged with its generation's index;
    the first error ends them all (closing this closes them all)."""
    if len(gens) == 1:
        async for item in gens[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Delta | Final] | BaseException | None] = asyncio.Queue()

    async def pump(i: int, gen: AsyncGenerator[Delta | Final, None]) -> None:
        try:
            async for item in gen:
                await queue.put((i, item))
        except Exception as e:
            await queue.put(e)
        finally:
            await gen.aclose()
        await queue.put(None)

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(tasks)
        while left:
            got = await queue.get()
            if got is None:
                left -= 1
            elif isinstance(got, BaseException):
                raise got
            else:
                yield got
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _usage(finals: list[Final]) -> dict[str, Any]:
    """One prompt's usage: its tokens once, every sequence's completion tokens."""
    finals = sorted(finals, key=lambda f: f.index)
    prompt = finals[0].prompt_tokens if finals else 0
    cached = finals[0].cached_tokens if finals else 0
    return usage_json(prompt, sum(f.completion_tokens for f in finals), cached)


def _batch_usage(finals: dict[int, list[Final]]) -> dict[str, Any]:
    """A batch of prompts: the sum of each prompt's usage."""
    parts = [_usage(fs) for fs in finals.values()]
    return usage_json(sum(u["prompt_tokens"] for u in parts),
                      sum(u["completion_tokens"] for u in parts),
                      sum(u["prompt_tokens_details"]["cached_tokens"] for u in parts))  # fmt: skip


async def _open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    return response


async def _close_stream(response: web.StreamResponse) -> None:
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()


def error_response(e: ApiError) -> web.Response:
    headers = {"Retry-After": str(max(1, round(e.retry_after)))} if e.retry_after else None
    return web.json_response(e.body(), status=e.status, headers=headers)


async def _send(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")


def _timing_headers(final: Final) -> dict[str, str]:
    return {"X-Epd-Timings": json.dumps({k: round(v, 6) for k, v in final.timings.items()})}
