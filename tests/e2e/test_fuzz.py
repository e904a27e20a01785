"""Property-based fuzzing of the HTTP API: 10,000 generated bodies and headers against a real
stack (`epd up`'s processes). Every answer is below 500, every error is OpenAI's error body,
the stack then serves a valid request, and nothing leaks: KV blocks, encoder pool bytes, shared
memory segments, in-flight requests all return to zero."""

from __future__ import annotations

import base64
import http.client
import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.up import StackConfig, running_stack
from tests.conftest import png_bytes

KEY = "fuzz-key"
EXAMPLES = 10_000
SHM_PREFIX = f"epd-fuzz-{os.getpid()}-"

PNG = png_bytes(40, 30, seed=5)
URLS = [
    "data:image/png;base64," + base64.b64encode(PNG).decode(),
    "data:image/png;base64," + base64.b64encode(PNG[:50]).decode(),  # a header, no pixels
    "data:image/png;base64,@@not base64@@",
    "data:text/plain;base64,aGk=",
    "data:image/png,%89PNG%0D%0A",
    "data:,",
    "https://example.com/cat.png",
    "file:///etc/passwd",
    "ftp://x",
    "",
]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=8,
)  # fmt: skip
# Values a field is likely to meet: plausible ones in and out of range, and anything at all.
plausible = (
    st.integers(min_value=-3, max_value=6)
    | st.floats(min_value=-3, max_value=3)
    | st.sampled_from([True, False, None, "", "true", "false", 0, 1, -1, 2**40, 0.5, [], {}])
    | json_values
)
FIELDS = [
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
    "stop", "stream", "stream_options", "logprobs", "top_logprobs", "n", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids",
    "user", "tools", "tool_choice", "response_format", "logit_bias", "guided_json",
    "structured_outputs", "echo", "best_of", "chat_template_kwargs", "skip_special_tokens",
    "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
    "parallel_tool_calls", "add_generation_prompt", "unknown_field",
]  # fmt: skip
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
        "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}  # fmt: skip
# Constraints a client may well send (each compiles once, then hits the replica's cache).
CONSTRAINTS = [
    {"response_format": {"type": "json_object"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {
        "type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"]}}}},
    {"structured_outputs": {"choice": ["yes", "no"]}},
    {"structured_outputs": {"regex": "[a-c]{1,3}"}},
    {"structured_outputs": {"grammar": 'root ::= "a" | "b" root'}},
    {"guided_json": {"type": "array", "items": {"type": "boolean"}}},
    {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}}},
    {"tools": [TOOL], "tool_choice": "required"},
    {"tools": [TOOL], "tool_choice": "auto"},
]  # fmt: skip
# Values a constraint field is likely to meet: specs that do not compile, shapes that are wrong.
specs = (
    st.text(max_size=12)
    | st.sampled_from(["a(", "[", "root ::= x", "{", '{"type": "bogus"}', "(?P<x>a)", "\\"])
    | st.fixed_dictionaries({"regex": st.text(max_size=8)})
    | st.fixed_dictionaries({"grammar": st.text(max_size=16)})
    | st.fixed_dictionaries({"json": json_values})
    | st.fixed_dictionaries({"choice": st.lists(st.text(max_size=4), max_size=3)})
    | st.fixed_dictionaries(
        {
            "type": st.sampled_from(["json_schema", "json_object", "text", "x"]),
            "json_schema": json_values,
        }
    )
)


@st.composite
def parts(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["text", "image", "image", "junk"]))
    if kind == "text":
        return {"type": "text", "text": draw(st.text(max_size=40) | json_values)}
    if kind == "image":
        url = draw(st.sampled_from(URLS) | st.text(max_size=20))
        ref = draw(st.sampled_from(["dict", "str", "detail"]))
        if ref == "str":
            return {"type": "image_url", "image_url": url}
        value = {"url": url} if ref == "dict" else {"url": url, "detail": draw(plausible)}
        return {"type": "image_url", "image_url": value}
    return draw(json_values)


@st.composite
def messages(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    out = []
    for _ in range(draw(st.integers(0, 3))):
        role = draw(st.sampled_from(["user", "user", "system", "assistant", "developer", "tool"])
                    | st.text(max_size=5))  # fmt: skip
        content = draw(st.text(max_size=60) | st.lists(parts(), max_size=3) | json_values)
        msg: dict[str, Any] = {"role": role, "content": content}
        if draw(st.integers(0, 9)) == 0:
            msg[draw(st.sampled_from(["name", "tool_calls", "x"]))] = draw(plausible)
        out.append(msg)
    return out


@st.composite
def valid_bodies(draw: st.DrawFn, model: str) -> Any:
    """Requests a client may well send: every value in range, all of them served."""
    content: list[Any] = [{"type": "text", "text": draw(st.text(max_size=40))}]
    if draw(st.booleans()):
        content.insert(draw(st.integers(0, 1)), {"type": "image_url", "image_url": {
            "url": draw(st.sampled_from([URLS[0], URLS[-1]]))}})  # fmt: skip
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}],
                            "max_tokens": draw(st.integers(1, 4))}  # fmt: skip
    stream = draw(st.booleans())
    options = {
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0.01, 1),
        "top_k": st.integers(-1, 50),
        "min_p": st.floats(0, 1),
        "seed": st.integers(-(1 << 63), (1 << 64) - 1),
        "stop": st.lists(st.text(min_size=1, max_size=3), max_size=3),
        "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2),
        "repetition_penalty": st.floats(0.5, 2),
        "ignore_eos": st.booleans(),
        "min_tokens": st.integers(0, 1),
        "stop_token_ids": st.lists(st.integers(0, 300), max_size=3),
    }
    for name in draw(st.lists(st.sampled_from(sorted(options)), max_size=6, unique=True)):
        body[name] = draw(options[name])
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    if draw(st.booleans()):
        body.update(logprobs=True, top_logprobs=draw(st.integers(0, 3)))
    if draw(st.integers(0, 3)) == 0:
        body["n"] = draw(st.integers(1, 3))
    if draw(st.integers(0, 3)) == 0:
        body.update(draw(st.sampled_from(CONSTRAINTS)))
    if draw(st.integers(0, 5)) == 0:
        body["chat_template_kwargs"] = {"enable_thinking": draw(st.booleans())}
    return body


@st.composite
def completion_bodies(draw: st.DrawFn, model: str) -> Any:
    """`/v1/completions`: prompts of every shape, in and out of range, and the usual fields."""
    prompt = draw(
        st.text(min_size=1, max_size=30)
        | st.lists(st.integers(0, 500), min_size=1, max_size=12)
        | st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=3)
        | st.lists(st.lists(st.integers(0, 500), min_size=1, max_size=6), min_size=1, max_size=3)
        | plausible
    )
    body: dict[str, Any] = {"model": model, "prompt": prompt,
                            "max_tokens": draw(st.integers(1, 4))}  # fmt: skip
    for name in draw(st.lists(st.sampled_from(["echo", "logprobs", "n", "stream", "seed",
                                               "temperature", "suffix", "stop", "guided_regex",
                                               "structured_outputs", "stream_options"]),
                              max_size=4, unique=True)):  # fmt: skip
        value = {"echo": st.booleans(), "logprobs": st.integers(0, 3) | plausible,
                 "n": st.integers(1, 3) | plausible, "stream": st.booleans(),
                 "seed": st.integers(0, 9), "temperature": st.floats(0, 2) | plausible,
                 "suffix": st.text(max_size=3) | plausible,
                 "stop": st.lists(st.text(min_size=1, max_size=2), max_size=2),
                 "guided_regex": st.sampled_from(["[a-z]{1,3}", "("]) | plausible,
                 "structured_outputs": specs, "stream_options": plausible}[name]  # fmt: skip
        body[name] = draw(value)
    if body.get("stream") is not True:
        body.pop("stream_options", None)
    return body


@st.composite
def chat_bodies(draw: st.DrawFn, model: str) -> Any:
    """A valid request with one or two things wrong (or odd), so that each bad value meets the
    code behind every check before it."""
    body = draw(valid_bodies(model))
    what = draw(st.sampled_from(["field", "field", "field", "messages", "model"]))
    if what == "messages":
        body["messages"] = draw(messages())
    elif what == "model":
        body["model"] = draw(st.sampled_from(["other", ""]) | json_values)
        if draw(st.booleans()):
            del body["model"]
    for name in draw(st.lists(st.sampled_from(FIELDS), min_size=what == "field", max_size=2,
                              unique=True)):  # fmt: skip
        spec_field = name in ("structured_outputs", "response_format") or name.startswith("guided")
        body[name] = draw(specs if spec_field and draw(st.booleans()) else plausible)
    return body


@st.composite
def requests(draw: st.DrawFn, model: str) -> tuple[str, str, bytes, dict[str, str]]:
    shape = draw(st.sampled_from(["valid"] * 2 + ["chat"] * 5 + ["completion", "json", "bytes",
                                                                    "path"]))  # fmt: skip
    method, path = "POST", "/v1/chat/completions"
    if shape == "valid":
        raw = json.dumps(draw(valid_bodies(model))).encode()
    elif shape == "completion":
        path = "/v1/completions"
        raw = json.dumps(draw(completion_bodies(model))).encode()
    elif shape == "chat":
        raw = json.dumps(draw(chat_bodies(model))).encode()
    elif shape == "json":
        raw = json.dumps(draw(json_values)).encode()
    elif shape == "bytes":
        raw = draw(st.binary(max_size=64))
    else:
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE"]))
        path = draw(st.sampled_from(["/v1/models", "/health", "/metrics", "/v1/completions",
                                     "/v1/chat/completions", "/tokenize", "/detokenize", "/nope",
                                     "/v1/../x"]))  # fmt: skip
        raw = draw(st.binary(max_size=16))
        if path in ("/tokenize", "/detokenize") and draw(st.booleans()):
            raw = json.dumps(draw(st.fixed_dictionaries({
                "prompt": plausible, "tokens": st.lists(st.integers(-2, 600), max_size=4)
                | plausible, "messages": messages()}))).encode()  # fmt: skip
    headers = {
        "Content-Type": draw(
            st.sampled_from(
                ["application/json", "text/plain", "application/x-www-form-urlencoded", "", "a/b"]
            )
        )
    }
    auth = draw(st.sampled_from(["good"] * 9 + ["wrong", "none", "basic"]))
    if auth != "none":
        headers["Authorization"] = {"good": f"Bearer {KEY}", "wrong": "Bearer nope",
                                    "basic": "Basic Zm9vOmJhcg=="}[auth]  # fmt: skip
    if draw(st.integers(0, 9)) == 0:
        name = draw(st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=10))
        headers[f"X-{name}"] = draw(st.text(st.characters(min_codepoint=32, max_codepoint=126),
                                            max_size=20))  # fmt: skip
    return method, path, raw, headers


class Client:
    """One keep-alive connection, reopened when the server closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def send(
        self, method: str, path: str, raw: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        for attempt in range(2):
            try:
                self.conn.request(method, path, body=raw, headers=headers)
                r = self.conn.getresponse()
                return r.status, r.read()
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                if attempt:
                    raise
        raise AssertionError("unreachable")


def check_answer(status: int, body: bytes, path: str) -> None:
    assert status < 500, (status, body[:300])
    if status >= 400 and path.startswith("/v1"):
        error = json.loads(body)["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str) and error["type"]
    if status == 200 and body.startswith(b"data: "):  # a stream: every event is JSON
        events = [x[6:] for x in body.split(b"\n\n") if x.startswith(b"data: ")]
        assert events[-1] == b"[DONE]"
        for e in events[:-1]:
            json.loads(e)


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return sum(float(x.split()[-1]) for x in lines if x.startswith(name + " "))


def metrics_port(log: Path) -> int:
    for line in log.read_text().splitlines():
        if "metrics on :" in line:
            return int(line.rsplit(":", 1)[1])
    raise AssertionError(f"no metrics port in {log}")


def segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(SHM_PREFIX)}


@pytest.mark.slow
def test_fuzzed_requests_never_crash_or_leak(tiny_model: Path, tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    (media / "ok.png").write_bytes(PNG)
    URLS.append(f"file://{media}/ok.png")
    cfg = StackConfig(
        model=str(tiny_model), encoders=1, transport="shm", http_port=0, api_key=KEY,
        kv_cache_bytes=16 << 20,
        extra_encoder_args=("--metrics-port", "0", "--shm-prefix", SHM_PREFIX),
        extra_language_args=("--metrics-port", "0", "--max-model-len", "96"),
        extra_gateway_args=("--allowed-local-media-path", str(media),
                            "--max-images-per-request", "2", "--max-request-body-bytes",
                            str(1 << 20), "--request-timeout", "60"),
    )  # fmt: skip
    with running_stack(cfg, timeout=180) as stack:
        client = Client(stack.http_port)
        model = tiny_model.name
        at_start = segments()
        seen: dict[int, int] = {}

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(requests(model))
        def one(request: tuple[str, str, bytes, dict[str, str]]) -> None:
            method, path, raw, headers = request
            status, body = client.send(method, path, raw, headers)
            seen[status] = seen.get(status, 0) + 1
            check_answer(status, body, path)

        one()
        assert sum(seen.values()) >= EXAMPLES and seen.get(200, 0) > 1000, seen
        # The stack still answers a valid request.
        good = {
            "model": model,
            "max_tokens": 3,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": URLS[0]}},
                        {"type": "text", "text": "hi"},
                    ],
                }
            ],
        }
        status, body = client.send("POST", "/v1/chat/completions", json.dumps(good).encode(),
                                   {"Authorization": f"Bearer {KEY}"})  # fmt: skip
        assert status == 200, body
        # Nothing left behind: requests, KV blocks, pool bytes, segments.
        lang = metrics_port(stack.role("language")[0].log_path)
        enc = metrics_port(stack.role("encoder")[0].log_path)
        end = time.monotonic() + 30
        while True:
            left = {
                "running": metric(lang, "epd_language_running_requests"),
                "waiting": metric(lang, "epd_language_waiting_requests"),
                "kv": metric(lang, "epd_language_kv_usage_ratio"),
                "pool": metric(enc, "epd_encoder_pool_bytes_in_use"),
            }
            if not any(left.values()) or time.monotonic() > end:
                break
            time.sleep(0.2)
        assert not any(left.values()), left
        assert segments() == at_start
    print(f"statuses: {dict(sorted(seen.items()))}")
