"""gRPC `Chat` service: the HTTP API's semantics for programmatic clients (streaming).

A request is turned into the HTTP API's JSON body and validated by the same code; its choices'
output goes through the same reasoning and tool-call parsing (`choices.py`)."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc

from common.rpc import gateway_pb2, gateway_pb2_grpc
from services.gateway.choices import ChoiceOutput
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
        self,
        orchestrator: Orchestrator,
        model_name: str,
        limits: Limits,
        api_key: str | None,
    ) -> None:
        self.orchestrator, self.model_name = orchestrator, model_name
        self.limits, self.api_key = limits, api_key
        self.reasoning_parser = orchestrator.options.reasoning_parser

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
        outs: dict[int, ChoiceOutput] = {}
        async for item in self.orchestrator.chat(req):
            out = outs.get(item.index) or outs.setdefault(
                item.index, ChoiceOutput(req, self.reasoning_parser)
            )
            if isinstance(item, Delta):
                yield _delta(item.index, out.feed(item.text), item)
                continue
            rest = out.finish()
            if rest:
                yield _delta(item.index, rest, None)
            yield gateway_pb2.ChatResponse(
                done=gateway_pb2.Done(
                    finish_reason=out.finish_reason(item.finish_reason),
                    prompt_tokens=item.prompt_tokens,
                    completion_tokens=item.completion_tokens,
                    cached_tokens=item.cached_tokens,
                    timings_seconds=item.timings,
                    index=item.index,
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
            msg: dict[str, Any] = {"role": m.role, "content": parts}
            if m.tool_calls:
                msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.name, "arguments": c.arguments}} for c in m.tool_calls]  # fmt: skip
            if m.tool_call_id:
                msg["tool_call_id"] = m.tool_call_id
            messages.append(msg)
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
        if r.n:
            body["n"] = r.n
        if r.HasField("constraint"):
            body["structured_outputs"] = _constraint(r.constraint)
        if r.tools_json:
            body["tools"] = _json_field(r.tools_json, "tools_json")
        if r.tool_choice:
            named = r.tool_choice not in ("none", "auto", "required")
            body["tool_choice"] = ({"type": "function", "function": {"name": r.tool_choice}}
                                   if named else r.tool_choice)  # fmt: skip
        if r.HasField("parallel_tool_calls"):
            body["parallel_tool_calls"] = r.parallel_tool_calls
        if r.chat_template_kwargs_json:
            kwargs = _json_field(r.chat_template_kwargs_json, "chat_template_kwargs_json")
            body["chat_template_kwargs"] = kwargs
        mm_kwargs = {name: getattr(r, f"video_{name}") for name in ("fps", "max_frames")
                     if r.HasField(f"video_{name}")}  # fmt: skip
        if mm_kwargs:
            body["mm_processor_kwargs"] = mm_kwargs
        return body


def _json_field(text: str, name: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ApiError(400, f"{name} is not valid JSON: {e}", name) from None


def _constraint(c: gateway_pb2.Constraint) -> dict[str, Any]:
    kind = c.WhichOneof("kind")
    if kind == "json_schema":
        return {"json": c.json_schema}
    if kind == "choice":
        return {"choice": list(c.choice.values)}
    if kind == "json_object":
        return {"json_object": c.json_object}
    if kind in ("regex", "grammar"):
        return {kind: getattr(c, kind)}
    raise ApiError(400, "constraint: no kind set", "constraint")


def _delta(
    index: int, pieces: list[dict[str, Any]], item: Delta | None
) -> gateway_pb2.ChatResponse:
    """One choice's parsed pieces (and the tokens they came from) as one Delta message."""
    d = gateway_pb2.Delta(index=index)
    if item is not None:
        d.token_ids.extend(item.token_ids)
        d.logprobs.extend(lp["logprob"] for lp in item.logprobs)
    for p in pieces:
        d.text += p.get("content") or ""
        d.reasoning_text += p.get("reasoning_content") or ""
        for tc in p.get("tool_calls", []):
            f = tc.get("function", {})
            d.tool_calls.append(gateway_pb2.ToolCallDelta(
                index=tc["index"], id=tc.get("id") or "", name=f.get("name") or "",
                arguments=f.get("arguments") or ""))  # fmt: skip
    return gateway_pb2.ChatResponse(delta=d)
