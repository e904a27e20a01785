"""`/v1/completions`, `/tokenize` and `/detokenize` requests and responses, as vLLM serves them.

A completion prompt is text, token ids, or a batch of either (a list): each prompt of a batch is
its own generation of `n` sequences, and its choices take indices `prompt * n + i`. The prompt is
used as it is, without a chat template. `echo` puts the prompt before each choice's text (and,
with `logprobs`, the prompt tokens' logprobs before the generated ones: the first prompt token
has none); `suffix` is refused, as vLLM refuses it. The sampling fields, `stop`, structured
outputs and `stream_options` mean what they mean for chat completions.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from services.gateway.openai_protocol import (
    ApiError,
    ChatRequest,
    _bool,
    _is_int,
    _stop,
    check_unsupported,
    include_usage_from_body,
    sampling_from_body,
    structured_from_body,
)

MAX_PROMPTS = 256  # prompts in one batched request
MAX_COMPLETION_LOGPROBS = 20


@dataclass
class CompletionRequest:
    model: str
    prompts: list[ChatRequest]  # one generation per prompt, `prompt` or `prompt_ids` set
    echo: bool = False
    logprobs: int | None = None  # top alternatives per token; None = off
    stream: bool = False
    include_usage: bool = False
    request_id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")


def parse_completion_request(body: Any) -> CompletionRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required and must be a string", "model")
    check_unsupported({k: v for k, v in body.items() if k != "echo"})
    if body.get("suffix") not in (None, ""):
        raise ApiError(400, "suffix is not supported", "suffix")
    for name in ("tools", "tool_choice", "messages"):
        if body.get(name) is not None:
            raise ApiError(400, f"{name} is a chat completions field; use /v1/chat/completions",
                           name)  # fmt: skip
    prompts = _prompts(body.get("prompt"))
    echo = _bool(body, "echo")
    lp = body.get("logprobs")
    if lp is not None and (not _is_int(lp) or not 0 <= lp <= MAX_COMPLETION_LOGPROBS):
        raise ApiError(400, f"logprobs must be an integer in [0, {MAX_COMPLETION_LOGPROBS}]",
                       "logprobs")  # fmt: skip
    stream = _bool(body, "stream")
    include_usage = include_usage_from_body(body, stream)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ApiError(400, "user must be a string", "user")
    body = {"max_tokens": 16, **body} if body.get("max_tokens") is None else body  # OpenAI's
    prompt_lp = lp if echo and lp is not None else None
    params = sampling_from_body(body, lp, structured_from_body(body), prompt_lp)
    stop = _stop(body.get("stop"))
    out = CompletionRequest(model, [], echo, lp, stream, include_usage)
    for i, p in enumerate(prompts):
        req = ChatRequest(model, [], [], params, stop, stream, include_usage, lp is not None,
                          request_id=f"{out.request_id}-{i}")  # fmt: skip
        if isinstance(p, str):
            req.prompt = p
        else:
            req.prompt_ids = p
        out.prompts.append(req)
    return out


def _prompts(v: Any) -> list[str | list[int]]:
    """One prompt, or a batch: text, a list of texts, token ids, a list of token-id lists."""
    bad = ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a "
                   "list of token-id lists", "prompt")  # fmt: skip
    if isinstance(v, str):
        items: list[Any] = [v]
    elif isinstance(v, list) and v and all(_is_int(t) for t in v):
        items = [v]
    elif isinstance(v, list) and v:
        items = v
    else:
        raise bad
    if len(items) > MAX_PROMPTS:
        raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request", "prompt")
    out: list[str | list[int]] = []
    for p in items:
        if isinstance(p, str):
            if not p:
                raise ApiError(400, "prompt must not be empty", "prompt")
            out.append(p)
        elif isinstance(p, list) and p and all(_is_int(t) for t in p):
            out.append(list(p))
        else:
            raise bad
    return out


# ---- responses ----


@dataclass
class ChoiceText:
    """One completion choice as it builds up."""

    index: int
    text: str = ""
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, text: str, logprobs: list[dict[str, Any]] | None) -> dict[str, Any] | None:
        """Append a delta; returns its logprobs in the completions shape (or None)."""
        start = len(self.text)
        self.text += text
        if logprobs is None:
            return None
        return self.add_logprobs(logprobs, start)

    def add_logprobs(self, entries: list[dict[str, Any]], start: int) -> dict[str, Any]:
        part = logprobs_json(entries, start)
        self.tokens += part["tokens"]
        self.token_logprobs += part["token_logprobs"]
        self.top_logprobs += part["top_logprobs"]
        return part

    def json(self, logprobs: bool) -> dict[str, Any]:
        lp = None
        if logprobs:
            offsets, at = [], 0
            for t in self.tokens:
                offsets.append(at)
                at += len(t)
            lp = {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                  "top_logprobs": self.top_logprobs, "text_offset": offsets}  # fmt: skip
        return {"index": self.index, "text": self.text, "logprobs": lp,
                "finish_reason": self.finish_reason}  # fmt: skip


def logprobs_json(entries: list[dict[str, Any]], start: int) -> dict[str, Any]:
    """Chat-shaped logprob entries -> completions' parallel lists (entries may be None: the
    first prompt token has no logprob)."""
    tokens, lps, tops, offsets = [], [], [], []
    at = start
    for e in entries:
        tokens.append(e["token"])
        lps.append(e["logprob"])
        tops.append({t["token"]: t["logprob"] for t in e["top_logprobs"]}
                    if e["logprob"] is not None else None)  # fmt: skip
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def completion_json(
    req: CompletionRequest, choices: list[dict[str, Any]], usage: dict[str, Any] | None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": req.request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": choices,
    }
    if usage is not None:
        out["usage"] = usage
    return out  # fmt: skip
