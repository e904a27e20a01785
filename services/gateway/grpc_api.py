"""gRPC `Chat` service: the HTTP API's semantics for programmatic clients (streaming)."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from typing import Any

import grpc

from common.rpc import gateway_pb2, gateway_pb2_grpc
from services.gateway.openai_protocol import ApiError, Limits, parse_chat_request
from services.gateway.orchestrator import Delta, Orchestrator

_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_PARSE_INLINE_BYTES = 64 * 1024  # requests with more image bytes are parsed off the event loop


class ChatServicer(gateway_pb2_grpc.ChatServicer):
    def __init__(
        self, orchestrator: Orchestrator, model_name: str, limits: Limits, api_key: str | None
    ) -> None:
        self.orchestrator, self.model_name = orchestrator, model_name
        self.limits, self.api_key = limits, api_key

    async def Complete(
        self, request: gateway_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.ChatResponse]:
        try:
            self._authorize(context)
            with self.orchestrator.admit():
                async for item in self._complete(request):
                    yield item
        except ApiError as e:
            await context.abort(_STATUS.get(e.status, grpc.StatusCode.INTERNAL), e.message)

    async def _complete(
        self, request: gateway_pb2.ChatRequest
    ) -> AsyncIterator[gateway_pb2.ChatResponse]:
        body = self._as_openai(request)
        if request.ByteSize() > _PARSE_INLINE_BYTES:
            req = await asyncio.to_thread(parse_chat_request, body, self.limits)
        else:
            req = parse_chat_request(body, self.limits)
        async for item in self.orchestrator.chat(req):
            if isinstance(item, Delta):
                yield gateway_pb2.ChatResponse(
                    delta=gateway_pb2.Delta(
                        text=item.text,
                        token_ids=item.token_ids,
                        logprobs=[lp["logprob"] for lp in item.logprobs],
                    )
                )
                continue
            yield gateway_pb2.ChatResponse(
                done=gateway_pb2.Done(
                    finish_reason=item.finish_reason,
                    prompt_tokens=item.prompt_tokens,
                    completion_tokens=item.completion_tokens,
                    cached_tokens=item.cached_tokens,
                    timings_seconds=item.timings,
                )
            )

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if not self.api_key:
            return
        given = dict(context.invocation_metadata() or ()).get("authorization", "")
        if not hmac.compare_digest(str(given).encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "invalid or missing API key (metadata authorization: Bearer KEY)")

    def _as_openai(self, r: gateway_pb2.ChatRequest) -> dict[str, Any]:
        """The request in the HTTP API's JSON shape, so both front doors validate alike."""
        messages = []
        for m in r.messages:
            parts: list[dict[str, Any]] = []
            for p in m.content:
                kind = p.WhichOneof("kind")
                if kind == "text":
                    parts.append({"type": "text", "text": p.text})
                elif kind == "image":
                    parts.append({"type": "image_bytes", "data": p.image})
                elif kind == "image_url":
                    parts.append({"type": "image_url", "image_url": {"url": p.image_url}})
                elif kind == "video":
                    parts.append({"type": "video_bytes", "data": p.video})
                elif kind == "video_url":
                    parts.append({"type": "video_url", "video_url": {"url": p.video_url}})
            messages.append({"role": m.role, "content": parts})
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": messages,
            "top_k": r.top_k,
            "min_p": r.min_p,
            "stop": list(r.stop),
            "ignore_eos": r.ignore_eos,
            "min_tokens": r.min_tokens,
            "presence_penalty": r.presence_penalty,
            "frequency_penalty": r.frequency_penalty,
        }
        if r.max_tokens:
            body["max_tokens"] = r.max_tokens
        for name in ("temperature", "top_p", "seed", "repetition_penalty"):
            if r.HasField(name):
                body[name] = getattr(r, name)
        if r.HasField("top_logprobs"):
            body.update(logprobs=True, top_logprobs=r.top_logprobs)
        kwargs = {name: getattr(r, f"video_{name}") for name in ("fps", "max_frames")
                  if r.HasField(f"video_{name}")}  # fmt: skip
        if kwargs:
            body["mm_processor_kwargs"] = kwargs
        return body
