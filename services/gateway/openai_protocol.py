"""OpenAI chat-completions requests and responses, as vLLM and SGLang serve them.

`parse_chat_request` turns a decoded JSON body into a `ChatRequest` whose sampling parameters are
the shared contract's `SamplingParams`, or raises `ApiError` (HTTP status, message, offending
parameter) before any work is done. Types are strict, as OpenAI's and vLLM's are: a string is not
a boolean, a float is not an integer. Accepted beyond OpenAI's fields: vLLM's sampling extensions
`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `min_tokens`, `stop_token_ids`, its
structured outputs (`structured_outputs`, `guided_*`; `structured_outputs.py`) and
`chat_template_kwargs`; tools and tool choices (`tools.py`); `n` sequences. Fields that OpenAI
or vLLM define but epd does not implement yet (`logit_bias`, `audio`, ...) are refused with 400
"not supported" unless they carry their neutral value; fields nobody defines are ignored, as vLLM
ignores them. The `*_response`/`*_chunk` builders produce the JSON the official client expects.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.contract import (
    ContractError,
    ImageLimits,
    SamplingParams,
    StructuredOutput,
    VideoLimits,
)
from common.contract.sampling import MAX_N, MAX_SEED
from services.gateway.media import (
    Image,
    MediaError,
    Video,
    load_image_url,
    load_video_url,
    read_image,
    read_video,
)
from services.gateway.structured_outputs import SpecError, parse_structured
from services.gateway.tools import ToolChoice, ToolError, parse_tools

ROLES = ("system", "user", "assistant", "developer", "tool")
MAX_STOP_STRINGS = 16
# Names the chat template itself binds; chat_template_kwargs may not replace them.
_TEMPLATE_NAMES = frozenset({"messages", "tools", "add_generation_prompt"})

# Known fields not implemented yet -> their neutral values (anything else is refused).
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "best_of": (None, 1),
    "use_beam_search": (None, False),
    "prompt_logprobs": (None,),
    "echo": (None, False),
    "chat_template": (None,),
    "continue_final_message": (None, False),
    "logits_processors": (None,),
    "truncate_prompt_tokens": (None,),
    "skip_special_tokens": (None, True),
    "include_stop_str_in_output": (None, False),
    "spaces_between_special_tokens": (None, True),
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.retry_after = retry_after  # seconds, sent as Retry-After (429/503)
        self.kind = kind or {
            400: "invalid_request_error",
            401: "authentication_error",
            404: "not_found_error",
            413: "invalid_request_error",
            429: "rate_limit_error",
            502: "upstream_error",
            503: "service_unavailable",
            504: "timeout_error",
        }.get(status, "internal_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}
        }


@dataclass(frozen=True)
class Limits:
    """What one request may carry."""

    images: ImageLimits = field(default_factory=ImageLimits)
    allowed_media_dir: Path | None = None  # where file:// URLs may read from; None = nowhere
    videos: VideoLimits = field(default_factory=VideoLimits)


@dataclass
class ChatRequest:
    """One generation request: a chat (`messages`) or, from /v1/completions, a text `prompt`
    or token ids (`prompt_ids`) used without a template."""

    model: str
    messages: list[dict[str, Any]]  # chat-template input: content is a str or text/image parts
    images: list[Image]  # in order of appearance
    params: SamplingParams  # max_tokens None = all the room the context leaves
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    request_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    tools: ToolChoice | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # chat_template_kwargs
    prompt: str = ""  # /v1/completions: the prompt text (no template)
    prompt_ids: list[int] | None = None  # /v1/completions: the prompt's token ids
    add_generation_prompt: bool = True  # the template ends with the assistant turn's start
    # The prompt as rendered, set by the orchestrator (the reasoning parser reads its end).
    prompt_text: str = ""
    videos: list[Video] = field(default_factory=list)  # in order of appearance
    # vLLM's `mm_processor_kwargs` for videos: None = the checkpoint's (checked against the
    # server's limits by the orchestrator, which knows them).
    video_fps: float | None = None
    video_max_frames: int | None = None


def parse_chat_request(body: Any, limits: Limits) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required and must be a string", "model")
    check_unsupported(body)
    videos: list[Video] = []
    messages, images = _messages(body.get("messages"), limits, videos)
    video_fps, video_max_frames = _mm_processor_kwargs(body.get("mm_processor_kwargs"))
    try:
        tools = parse_tools(body)
    except ToolError as e:
        raise ApiError(400, str(e), e.param) from None
    structured = structured_from_body(body)
    if tools is not None and tools.forced:
        if structured is not None:
            raise ApiError(400, "tool_choice required or named cannot be combined with another "
                           "structured-output constraint", "tool_choice")  # fmt: skip
        try:
            structured = tools.schema()
        except ContractError as e:
            raise ApiError(400, f"tools: {e}", "tools") from None
    stream = _bool(body, "stream")
    logprobs = _bool(body, "logprobs")
    top = body.get("top_logprobs")
    if top is not None and (not _is_int(top) or not 0 <= top <= 20):
        raise ApiError(400, "top_logprobs must be an integer in [0, 20]", "top_logprobs")
    if top and not logprobs:
        raise ApiError(400, "top_logprobs requires logprobs=true", "top_logprobs")
    include_usage = include_usage_from_body(body, stream)
    for name in ("user", "prompt_cache_key", "safety_identifier", "service_tier"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise ApiError(400, f"{name} must be a string", name)
    params = sampling_from_body(body, (top or 0) if logprobs else None, structured)
    return ChatRequest(
        model=model,
        messages=messages,
        images=images,
        params=params,
        stop=_stop(body.get("stop")),
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        tools=tools,
        template_kwargs=_template_kwargs(body.get("chat_template_kwargs")),
        add_generation_prompt=body.get("add_generation_prompt") is None
        or _bool(body, "add_generation_prompt"),
        videos=videos,
        video_fps=video_fps,
        video_max_frames=video_max_frames,
    )


def include_usage_from_body(body: dict[str, Any], stream: bool) -> bool:
    """`stream_options.include_usage` (only with stream=true, as OpenAI has it)."""
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    include_usage = _bool(options or {}, "include_usage", "stream_options.include_usage")
    if options and not stream:
        raise ApiError(400, "stream_options is only allowed with stream=true", "stream_options")
    return include_usage


def check_unsupported(body: dict[str, Any]) -> None:
    for name, neutral in _UNSUPPORTED.items():
        if name in body and not any(_same(body[name], v) for v in neutral):
            raise ApiError(400, f"'{name}' is not supported by this server yet", name)


def structured_from_body(body: dict[str, Any]) -> StructuredOutput | None:
    try:
        return parse_structured(body)
    except SpecError as e:
        raise ApiError(400, str(e), e.param) from None


def sampling_from_body(
    body: dict[str, Any],
    logprobs: int | None,
    structured: StructuredOutput | None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """The sampling fields every endpoint shares; 400 naming the bad one."""
    n = body.get("n")
    try:
        return SamplingParams(
            max_tokens=_max_tokens(body),
            temperature=_get(body, "temperature", 1.0),
            top_p=_get(body, "top_p", 1.0),
            top_k=_top_k(body),
            min_p=_get(body, "min_p", 0.0),
            seed=_seed(body),
            repetition_penalty=_get(body, "repetition_penalty", 1.0),
            presence_penalty=_get(body, "presence_penalty", 0.0),
            frequency_penalty=_get(body, "frequency_penalty", 0.0),
            stop_token_ids=_token_ids(body, "stop_token_ids"),
            ignore_eos=_get(body, "ignore_eos", False),
            min_tokens=_get(body, "min_tokens", 0),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            n=1 if n is None else n,
            structured=structured,
        )
    except ContractError as e:
        if e.param == "n":
            raise ApiError(400, f"n must be an integer in [1, {MAX_N}]", "n") from None
        raise ApiError(400, str(e), e.param) from None


def _template_kwargs(v: Any) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(k, str) and k.isidentifier() for k in v):
        raise ApiError(400, "chat_template_kwargs must be an object of named values",
                       "chat_template_kwargs")  # fmt: skip
    clash = sorted(_TEMPLATE_NAMES & v.keys())
    if clash:
        raise ApiError(400, f"chat_template_kwargs may not set {', '.join(clash)}",
                       "chat_template_kwargs")  # fmt: skip
    return dict(v)


def _mm_processor_kwargs(v: Any) -> tuple[float | None, int | None]:
    """vLLM's per-request processor settings: `fps` and `max_frames` (videos)."""
    if v is None:
        return None, None
    if not isinstance(v, dict):
        raise ApiError(400, "mm_processor_kwargs must be an object", "mm_processor_kwargs")
    unknown = sorted(set(v) - {"fps", "max_frames"})
    if unknown:
        raise ApiError(400, f"mm_processor_kwargs: {', '.join(unknown)} not supported (fps and "
                       "max_frames are)", "mm_processor_kwargs")  # fmt: skip
    fps, max_frames = v.get("fps"), v.get("max_frames")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, int | float)):
        raise ApiError(400, "mm_processor_kwargs.fps must be a number", "mm_processor_kwargs")
    if max_frames is not None and not _is_int(max_frames):
        raise ApiError(400, "mm_processor_kwargs.max_frames must be an integer",
                       "mm_processor_kwargs")  # fmt: skip
    return (None if fps is None else float(fps)), max_frames


def _messages(
    raw: Any, limits: Limits, videos: list[Video]
) -> tuple[list[dict[str, Any]], list[Image]]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    out: list[dict[str, Any]] = []
    images: list[Image] = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ApiError(400, f"{where} must be an object", where)
        role = msg.get("role")
        if role not in ROLES:
            raise ApiError(400, f"{where}: role must be one of {', '.join(ROLES)}", where)
        if msg.get("function_call") is not None:
            raise ApiError(400, f"{where}: function_call is deprecated: use tool_calls", where)
        for name in ("name", "tool_call_id", "reasoning_content"):
            if msg.get(name) is not None and not isinstance(msg[name], str):
                raise ApiError(400, f"{where}.{name} must be a string", where)
        role = "system" if role == "developer" else role
        content = msg.get("content")
        entry: dict[str, Any]
        if isinstance(content, str):
            entry = {"role": role, "content": content}
        elif isinstance(content, list):
            entry = {"role": role, "content": _parts(content, where, images, limits, videos)}
        elif content is None and role == "assistant":
            entry = {"role": role, "content": ""}
        else:
            raise ApiError(400, f"{where}.content must be a string or a list of parts", where)
        if msg.get("tool_calls") is not None:
            if role != "assistant":
                raise ApiError(400, f"{where}: only assistant messages carry tool_calls", where)
            entry["tool_calls"] = _tool_calls(msg["tool_calls"], where)
        for name in ("tool_call_id", "reasoning_content", "name"):
            if msg.get(name) is not None:
                entry[name] = msg[name]
        out.append(entry)
    return out, images


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant turn's calls, as the chat template reads them (arguments as JSON text)."""
    if not isinstance(calls, list):
        raise ApiError(400, f"{where}.tool_calls must be a list", where)
    out = []
    for j, c in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise ApiError(400, f"{at}.function.name must be a string", where)
        args = f.get("arguments", "{}")
        if not isinstance(args, str):
            raise ApiError(400, f"{at}.function.arguments must be a JSON string", where)
        call_id = c.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise ApiError(400, f"{at}.id must be a string", where)
        out.append({"id": call_id or "", "type": "function",
                    "function": {"name": f["name"], "arguments": args}})  # fmt: skip
    return out


def _parts(
    parts: list[Any], where: str, images: list[Image], limits: Limits, videos: list[Video]
) -> list[dict]:
    out: list[dict[str, Any]] = []
    for j, part in enumerate(parts):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"{at}: text must be a string", at)
            out.append({"type": "text", "text": part["text"]})
            continue
        if kind in ("video_url", "video_bytes"):
            if len(videos) >= limits.videos.max_videos_per_request:
                most = limits.videos.max_videos_per_request
                raise ApiError(400, f"too many videos: at most {most} per request", at)
            try:
                videos.append(_video(part, at, limits))
            except MediaError as e:
                raise ApiError(413 if e.too_large else 400, f"{at}: {e}", at) from None
            out.append({"type": "video"})
            continue
        if kind not in ("image_url", "image_bytes"):
            raise ApiError(400, f"{at}: unsupported content part type {_show(kind)}", at)
        if len(images) >= limits.images.max_images_per_request:
            raise ApiError(
                400, f"too many images: at most {limits.images.max_images_per_request} per "
                "request", at,
            )  # fmt: skip
        try:
            images.append(_image(part, at, limits))
        except MediaError as e:
            raise ApiError(413 if e.too_large else 400, f"{at}: {e}", at) from None
        out.append({"type": "image"})
    return out


def _image(part: dict[str, Any], at: str, limits: Limits) -> Image:
    if part["type"] == "image_bytes":  # gRPC only: raw bytes
        if not isinstance(part.get("data"), bytes):
            raise ApiError(400, f"{at}: data must be bytes", at)
        return read_image(part["data"], limits.images)
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str):
        raise ApiError(400, f"{at}: image_url.url must be a string", at)
    if isinstance(ref, dict) and ref.get("detail") not in (None, "auto", "low", "high"):
        raise ApiError(400, f"{at}: image_url.detail must be auto, low or high", at)
    return load_image_url(url, limits.allowed_media_dir, limits.images)


def _video(part: dict[str, Any], at: str, limits: Limits) -> Video:
    if part["type"] == "video_bytes":  # gRPC only: raw bytes
        if not isinstance(part.get("data"), bytes):
            raise ApiError(400, f"{at}: data must be bytes", at)
        return read_video(part["data"], limits.videos)
    ref = part.get("video_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str):
        raise ApiError(400, f"{at}: video_url.url must be a string", at)
    return load_video_url(url, limits.allowed_media_dir, limits.videos)


def _same(a: Any, b: Any) -> bool:
    """Equality that does not take True for 1 or 1.0 for 1."""
    return type(a) is type(b) and a == b


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bool(body: dict[str, Any], name: str, param: str | None = None) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(400, f"{param or name} must be a boolean, got {_show(v)}", param or name)
    return v


def _get(body: dict[str, Any], name: str, default: Any) -> Any:
    v = body.get(name)
    return default if v is None else v


def _max_tokens(body: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        v = body.get(name)
        if v is not None:
            if not _is_int(v) or v <= 0:
                raise ApiError(400, f"{name} must be a positive integer, got {_show(v)}", name)
            return int(v)
    return None


def _top_k(body: dict[str, Any]) -> Any:
    v = body.get("top_k")
    return 0 if v is None or (_is_int(v) and v == -1) else v  # -1: vLLM's spelling of "off"


def _seed(body: dict[str, Any]) -> int | None:
    v = body.get("seed")
    if v is None:
        return None
    if not _is_int(v) or not -(1 << 63) <= v <= MAX_SEED:
        raise ApiError(400, "seed must be a 64-bit integer", "seed")
    return int(v) & MAX_SEED  # negative seeds as their two's complement, as numpy takes them


def _token_ids(body: dict[str, Any], name: str) -> tuple[Any, ...]:
    v = body.get(name)
    if v is None:
        return ()
    if not isinstance(v, list):
        raise ApiError(400, f"{name} must be a list of token ids", name)
    return tuple(v)


def _stop(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v else []
    if isinstance(v, list) and all(isinstance(s, str) for s in v) and len(v) <= MAX_STOP_STRINGS:
        return [s for s in v if s]
    raise ApiError(
        400, f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings", "stop"
    )


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


# ---- responses ----


def usage_json(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def chat_response(
    req: ChatRequest, choices: list[dict[str, Any]], usage: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": req.request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": choices,
        "usage": usage,
    }


def chat_choice(
    index: int, message: dict[str, Any], finish: str, logprobs: list | None
) -> dict[str, Any]:
    return {
        "index": index,
        "message": message,
        "logprobs": {"content": logprobs} if logprobs is not None else None,
        "finish_reason": finish,
    }


def chunk(
    req: ChatRequest,
    delta: dict[str, Any],
    finish: str | None = None,
    logprobs: list | None = None,
    index: int = 0,
) -> dict[str, Any]:
    return {
        "id": req.request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": req.model,
        "choices": [
            {
                "index": index,
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
