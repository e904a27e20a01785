"""OpenAI chat-completions requests and responses, as vLLM and SGLang serve them.

`parse_chat_request` validates a decoded JSON body into a `ChatRequest` (raising `ApiError` with
the HTTP status, message and offending parameter); the `*_response`/`*_chunk` builders produce
the JSON the official client expects. Accepted beyond OpenAI's fields: vLLM's sampling extensions
`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `min_tokens`, `stop_token_ids`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.gateway.media import MediaError, check_image_bytes, load_image_url
from services.language.engine.request import SamplingParams

ROLES = ("system", "user", "assistant", "developer")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or {
            400: "invalid_request_error",
            401: "authentication_error",
            404: "not_found_error",
            413: "invalid_request_error",
            429: "rate_limit_error",
            503: "service_unavailable",
            504: "timeout_error",
        }.get(status, "internal_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}
        }


@dataclass(frozen=True)
class Limits:
    max_images: int = 16
    max_image_bytes: int = 20 << 20
    allowed_media_dir: Path | None = None


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]  # chat-template input: content is a str or text/image parts
    images: list[bytes]  # in order of appearance
    max_tokens: int | None  # None = up to the context
    sampling: dict[str, Any]  # SamplingParams fields except max_tokens (validated)
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    request_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")


def parse_chat_request(body: Any, limits: Limits) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required", "model")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    messages, images = _messages(body.get("messages"), limits)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens <= 0):
        raise ApiError(400, "max_tokens must be a positive integer", "max_tokens")
    logprobs = bool(body.get("logprobs") or False)
    top = body.get("top_logprobs")
    if top is not None and (not _is_int(top) or not 0 <= top <= 20):
        raise ApiError(400, "top_logprobs must be an integer in [0, 20]", "top_logprobs")
    if top and not logprobs:
        raise ApiError(400, "top_logprobs requires logprobs=true", "top_logprobs")
    sampling: dict[str, Any] = {
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0),
        "top_k": int(_number(body, "top_k", 0, -1, 1 << 30)),
        "min_p": _number(body, "min_p", 0.0, 0.0, 1.0),
        "repetition_penalty": _number(body, "repetition_penalty", 1.0, 0.0, 10.0),
        "presence_penalty": _number(body, "presence_penalty", 0.0, -2.0, 2.0),
        "frequency_penalty": _number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        "seed": _optional_int(body, "seed"),
        "ignore_eos": bool(body.get("ignore_eos", False)),
        "min_tokens": int(_number(body, "min_tokens", 0, 0, 1 << 30)),
        "stop_token_ids": tuple(_int_list(body, "stop_token_ids")),
        "logprobs": (top or 0) if logprobs else None,
    }
    if sampling["top_k"] == -1:  # vLLM spelling of "off"
        sampling["top_k"] = 0
    try:  # the engine's own validation, so both sides agree on what is valid
        SamplingParams(max_tokens=max_tokens or 1 << 30, **sampling)
    except ValueError as e:
        raise ApiError(400, str(e), str(e).split(" ")[0]) from None
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    return ChatRequest(
        model=model,
        messages=messages,
        images=images,
        max_tokens=max_tokens,
        sampling=sampling,
        stop=_stop(body.get("stop")),
        stream=bool(body.get("stream", False)),
        include_usage=bool(options.get("include_usage", False)),
        logprobs=logprobs,
        top_logprobs=top or 0,
    )


def _messages(raw: Any, limits: Limits) -> tuple[list[dict[str, Any]], list[bytes]]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    out: list[dict[str, Any]] = []
    images: list[bytes] = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            raise ApiError(400, f"{where}: role must be one of {', '.join(ROLES)}", where)
        role = "system" if msg["role"] == "developer" else msg["role"]
        content = msg.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
        elif isinstance(content, list):
            out.append({"role": role, "content": _parts(content, where, images, limits)})
        elif content is None and role == "assistant":
            out.append({"role": role, "content": ""})
        else:
            raise ApiError(400, f"{where}.content must be a string or a list of parts", where)
    return out, images


def _parts(parts: list[Any], where: str, images: list[bytes], limits: Limits) -> list[dict]:
    out: list[dict[str, Any]] = []
    for j, part in enumerate(parts):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise ApiError(400, f"{at}: image_url.url must be a string", at)
            if len(images) >= limits.max_images:
                raise ApiError(400, f"too many images: at most {limits.max_images} per request", at)
            try:
                images.append(load_image_url(url, limits.allowed_media_dir, limits.max_image_bytes))
            except MediaError as e:
                status = 413 if "over the limit" in str(e) else 400
                raise ApiError(status, f"{at}: {e}", at) from None
            out.append({"type": "image"})
        elif kind == "image_bytes" and isinstance(part.get("data"), bytes):  # gRPC only
            if len(images) >= limits.max_images:
                raise ApiError(400, f"too many images: at most {limits.max_images} per request", at)
            try:
                images.append(check_image_bytes(part["data"], limits.max_image_bytes))
            except MediaError as e:
                status = 413 if "over the limit" in str(e) else 400
                raise ApiError(status, f"{at}: {e}", at) from None
            out.append({"type": "image"})
        else:
            raise ApiError(400, f"{at}: unsupported content part type {kind!r}", at)
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise ApiError(400, f"{name} must be a number in [{lo}, {hi}], got {v!r}", name)
    return float(v) if isinstance(default, float) else v


def _optional_int(body: dict[str, Any], name: str) -> int | None:
    v = body.get(name)
    if v is not None and not _is_int(v):
        raise ApiError(400, f"{name} must be an integer", name)
    return v


def _int_list(body: dict[str, Any], name: str) -> list[int]:
    v = body.get(name) or []
    if not isinstance(v, list) or not all(_is_int(x) and x >= 0 for x in v):
        raise ApiError(400, f"{name} must be a list of token ids", name)
    return v


def _stop(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(s, str) for s in v) and len(v) <= 16:
        return [s for s in v if s]
    raise ApiError(400, "stop must be a string or a list of at most 16 strings", "stop")


# ---- responses ----


def usage_json(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def completion_response(
    req: ChatRequest, text: str, finish: str, usage: dict[str, Any], logprobs: list | None
) -> dict[str, Any]:
    return {
        "id": req.request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": {"content": logprobs} if logprobs is not None else None,
                "finish_reason": finish,
            }
        ],
        "usage": usage,
    }


def chunk(
    req: ChatRequest,
    delta: dict[str, Any],
    finish: str | None = None,
    logprobs: list | None = None,
) -> dict[str, Any]:
    return {
        "id": req.request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": req.model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": {"content": logprobs} if logprobs is not None else None,
                "finish_reason": finish,
            }
        ],
    }


def usage_chunk(req: ChatRequest, usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": req.request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": req.model,
        "choices": [],
        "usage": usage,
    }
