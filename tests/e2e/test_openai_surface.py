"""What vLLM users send beyond plain chats, through `epd up` and the official OpenAI client:
structured outputs, tool calls, reasoning, n > 1, /v1/completions, /tokenize and /detokenize.

The checkpoint is the tiny random one: its weights never produce valid JSON, one of a list of
choices, a regex match or a tool call by chance, so every such output here is the constraint's.
"""

from __future__ import annotations

import json
import re
import urllib.request
import uuid

import jsonschema
import openai
import pytest

from services.up import StackConfig, running_stack
from tests.e2e.test_stack import data_url, metrics_port

KEY = "surface-key"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "colour": {"enum": ["red", "green", "blue"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "integer", "minimum": 0, "maximum": 99999},
            },
            "required": ["city", "zip"],
        },
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "colour", "address"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "maxLength": 8}}, "required": ["zone"]}},
}  # fmt: skip


@pytest.fixture(scope="module")
def stack(tiny_model):
    cfg = StackConfig(
        model=str(tiny_model), http_port=0, api_key=KEY, kv_cache_bytes=16 << 20,
        extra_encoder_args=("--metrics-port", "0"),
        extra_language_args=("--metrics-port", "0"),
        extra_gateway_args=("--reasoning-parser", "qwen3"),
    )  # fmt: skip
    with running_stack(cfg, timeout=180) as s:
        yield s


def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=KEY, max_retries=0, timeout=120)


def name(stack) -> str:
    return client(stack).models.list().data[0].id


def chat(stack, stream: bool = False, **kw):
    """One chat; the whole text (content) and the finish reason, streamed or not."""
    kw.setdefault("messages", [{"role": "user", "content": "Answer."}])
    kw.setdefault("max_tokens", 300)  # every value the schemas allow is bounded: room for all
    if not stream:
        r = client(stack).chat.completions.create(model=name(stack), **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason
    chunks = list(client(stack).chat.completions.create(model=name(stack), stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1]


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return sum(float(x.split()[-1]) for x in lines if x.startswith(name) and x[len(name)] in " {")


def role_port(stack, role: str) -> int:
    return metrics_port(stack.role(role)[0])


def post(stack, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{stack.http_port}{path}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates(stack, stream, temperature):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    text, finish = chat(stack, stream, response_format=fmt, temperature=temperature, seed=3)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert finish == "stop"


def test_json_object_and_the_older_spellings(stack):
    text, _ = chat(stack, response_format={"type": "json_object"}, temperature=1.0, seed=1)
    assert isinstance(json.loads(text), dict)
    text, _ = chat(stack, extra_body={"guided_json": SCHEMA}, temperature=1.0, seed=2)
    jsonschema.validate(json.loads(text), SCHEMA)
    text, _ = chat(stack, extra_body={"structured_outputs": {"json": json.dumps(SCHEMA)}})
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("stream", [False, True])
def test_choice_regex_and_grammar(stack, stream):
    choices = ["yes", "no", "maybe later"]
    for seed in range(3):
        text, finish = chat(stack, stream, temperature=1.0, seed=seed,
                            extra_body={"structured_outputs": {"choice": choices}})  # fmt: skip
        assert text in choices and finish == "stop"
    text, _ = chat(stack, stream, extra_body={"guided_choice": choices})
    assert text in choices
    pattern = r"[A-Z][a-z]{2,5}-\d{3}"
    text, _ = chat(stack, stream, temperature=1.0, extra_body={"guided_regex": pattern})
    assert re.fullmatch(pattern, text), text
    grammar = 'root ::= greeting " " number\ngreeting ::= "hello" | "bye"\nnumber ::= [1-9] [0-9]*'
    text, _ = chat(stack, stream, temperature=1.0, max_tokens=40,
                   extra_body={"structured_outputs": {"grammar": grammar}})  # fmt: skip
    assert re.fullmatch(r"(hello|bye) [1-9][0-9]*", text), text


def test_invalid_specs_get_400_before_any_image_is_encoded(stack, png):
    image = {"type": "image_url", "image_url": {"url": data_url(png(64, 48, 9))}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "describe"}]}]
    images = metric(role_port(stack, "encoder"), "epd_encoder_cache_misses_total")
    cases = [
        ({"structured_outputs": {"regex": "a("}}, "invalid regex"),
        ({"structured_outputs": {"grammar": "root ::= nothing"}}, "invalid grammar"),
        ({"guided_json": {"type": "no-such-type"}}, "invalid json schema"),
        ({"structured_outputs": {"json": "{not json"}}, "not valid JSON"),
        ({"structured_outputs": {"choice": []}}, "choice"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "at most one"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "names no tool"),
        ({"tools": [{"type": "function"}]}, "function.name"),
        ({"n": 0}, "n must be"),
        ({"chat_template_kwargs": {"messages": []}}, "may not set"),
    ]  # fmt: skip
    for extra, text in cases:
        code, body = post(
            stack,
            "/v1/chat/completions",
            {"model": name(stack), "messages": messages, "max_tokens": 4, **extra},
        )
        assert code == 400, (extra, body)
        assert text in body["error"]["message"], (extra, body)
    assert metric(role_port(stack, "encoder"), "epd_encoder_cache_misses_total") == images
    code, _ = post(stack, "/v1/chat/completions",
                   {"model": name(stack), "messages": messages, "max_tokens": 2})  # fmt: skip
    assert code == 200  # and the stack still serves


def _calls(message):
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]


def test_named_and_required_tool_calls_validate(stack):
    c = client(stack)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice, extra in ((named, {}), ("required", {"parallel_tool_calls": False})):
        r = c.chat.completions.create(model=name(stack), messages=messages, tools=[CLOCK, WEATHER],
                                      tool_choice=choice, max_tokens=200, temperature=1.0,
                                      seed=4, **extra)  # fmt: skip
        ((fn, args),) = _calls(r.choices[0].message)
        assert r.choices[0].finish_reason == "tool_calls"
        assert fn in ("get_weather", "get_time") and (choice == "required" or fn == "get_weather")
        jsonschema.validate(args, (WEATHER if fn == "get_weather" else CLOCK)["function"]
                            ["parameters"])  # fmt: skip
    # A follow-up turn with the call and its result renders and generates.
    call = r.choices[0].message.tool_calls[0]
    fn = {"name": call.function.name, "arguments": call.function.arguments}
    follow = [
        *messages,
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": call.id, "type": "function", "function": fn}]},
        {"role": "tool", "tool_call_id": call.id, "content": "22 degrees, sunny"},
    ]  # fmt: skip
    r2 = c.chat.completions.create(model=name(stack), messages=follow, tools=[CLOCK, WEATHER],
                                   max_tokens=8)  # fmt: skip
    assert r2.usage.completion_tokens > 0 and r2.choices[0].finish_reason in ("stop", "length")
    tokens = post(stack, "/tokenize", {"messages": follow, "tools": [CLOCK, WEATHER]})[1]
    rendered = post(stack, "/detokenize", {"tokens": tokens["tokens"]})[1]["prompt"]
    assert "<tool_response>\n22 degrees, sunny\n</tool_response>" in rendered
    assert '<tool_call>\n{"name": "' + call.function.name + '", "arguments": ' in rendered
    assert '"name": "get_weather"' in rendered.split("\n</tools>")[0]  # the tools, in the system


def test_streamed_tool_calls_come_as_openai_chunks(stack):
    messages = [{"role": "user", "content": "Weather?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in (named, "required"):
        chunks = list(client(stack).chat.completions.create(
            model=name(stack), messages=messages, tools=[WEATHER], tool_choice=choice,
            max_tokens=200, temperature=1.0, seed=6, stream=True, parallel_tool_calls=False,
        ))  # fmt: skip
        deltas = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
        assert {d.index for d in deltas} == {0}
        heads = [d for d in deltas if d.id is not None]
        assert len(heads) == 1 and heads[0].function.name == "get_weather"
        assert all(d.function.name is None for d in deltas if d.id is None)  # the name once
        args = "".join(d.function.arguments or "" for d in deltas)
        jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
        if choice == named:  # arguments stream as they are generated
            assert sum(1 for d in deltas if d.function.arguments) > 3


def test_reasoning_content_is_split_from_the_answer(stack):
    regex = r"<think>[a-z]{3,8}</think>[a-z]{3,8}"
    for stream in (False, True):
        kw = {"max_tokens": 60, "temperature": 1.0, "seed": 8,
              "extra_body": {"guided_regex": regex}}  # fmt: skip
        if stream:
            chunks = list(client(stack).chat.completions.create(
                model=name(stack), messages=[{"role": "user", "content": "Think."}],
                stream=True, **kw))  # fmt: skip
            delta = [ch.choices[0].delta for ch in chunks if ch.choices]
            reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in delta)
            content = "".join(d.content or "" for d in delta)
        else:
            m = (
                client(stack)
                .chat.completions.create(
                    model=name(stack), messages=[{"role": "user", "content": "Think."}], **kw
                )
                .choices[0]
                .message
            )
            reasoning, content = m.reasoning_content, m.content
        assert re.fullmatch("[a-z]{3,8}", reasoning) and re.fullmatch("[a-z]{3,8}", content)


def test_chat_template_kwargs_reach_the_template(stack):
    messages = [{"role": "user", "content": "hi"}]
    plain = post(stack, "/tokenize", {"messages": messages})[1]
    off = post(
        stack,
        "/tokenize",
        {"messages": messages, "chat_template_kwargs": {"enable_thinking": False}},
    )[1]
    text = post(stack, "/detokenize", {"tokens": off["tokens"]})[1]["prompt"]
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert off["count"] > plain["count"] and off["max_model_len"] > 0
    # With thinking off, the qwen3 parser leaves everything in content.
    m = client(stack).chat.completions.create(
        model=name(stack), messages=messages, max_tokens=40, temperature=1.0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False},
                    "guided_regex": r"[a-z]{2,6}</think>[a-z]{2,6}"},
    ).choices[0].message  # fmt: skip
    assert m.reasoning_content is None and "</think>" in m.content


def test_n_sequences_share_one_prefill_and_reproduce(stack):
    prompt = "Tell a long story about the sea and the ships. " * 3 + uuid.uuid4().hex
    messages = [{"role": "user", "content": prompt}]
    port = role_port(stack, "language")
    hits = metric(port, "epd_language_prefix_cache_hit_tokens_total")

    def three():
        return client(stack).chat.completions.create(
            model=name(stack), messages=messages, n=3, seed=11, temperature=1.0, max_tokens=6
        )

    r = three()
    gained = metric(port, "epd_language_prefix_cache_hit_tokens_total") - hits
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    texts = [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]
    assert len(set(texts)) == 3  # each sequence its own seed stream
    p = r.usage.prompt_tokens
    full = (p - 1) // 16 * 16  # the prompt's full blocks (block size 16), all but the first
    assert gained == 2 * full and full >= p - 16  # sequences 1, 2 computed < one block each
    assert (
        r.usage.completion_tokens
        == sum(len(c.logprobs.content) if c.logprobs else 0 for c in r.choices)
        or r.usage.completion_tokens >= 3
    )  # summed over the choices
    again = three()
    assert [c.message.content for c in sorted(again.choices, key=lambda c: c.index)] == texts
    stream = list(client(stack).chat.completions.create(
        model=name(stack), messages=messages, n=3, seed=11, temperature=1.0, max_tokens=6,
        stream=True, stream_options={"include_usage": True}))  # fmt: skip
    by_index: dict[int, str] = {}
    for ch in stream:
        for c in ch.choices:
            by_index[c.index] = by_index.get(c.index, "") + (c.delta.content or "")
    assert [by_index[i] for i in range(3)] == texts
    assert stream[-1].usage.completion_tokens == r.usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_completions_text_ids_batches_echo_logprobs(stack, tiny_model, stream):
    from common.tokenizer import ChatTokenizer

    tok = ChatTokenizer(tiny_model)
    c = client(stack)
    m = name(stack)
    text_prompt = "The quick brown fox"
    ids = tok.encode(text_prompt)

    def run(**kw):
        if not stream:
            return c.completions.create(model=m, **kw)
        chunks = list(
            c.completions.create(model=m, stream=True, stream_options={"include_usage": True}, **kw)
        )
        return chunks

    def texts(r) -> dict[int, str]:
        if not stream:
            return {ch.index: ch.text for ch in r.choices}
        out: dict[int, str] = {}
        for chunk in r:
            for ch in chunk.choices:
                out[ch.index] = out.get(ch.index, "") + ch.text
        return out

    greedy = run(prompt=text_prompt, max_tokens=5, temperature=0)
    from_ids = run(prompt=ids, max_tokens=5, temperature=0)
    assert texts(greedy) == texts(from_ids) and len(texts(greedy)[0]) > 0
    batch = run(prompt=[text_prompt, "Numbers: 0 1 2"], max_tokens=5, temperature=0, n=2)
    out = texts(batch)
    assert sorted(out) == [0, 1, 2, 3] and out[0] == out[1] == texts(greedy)[0]
    usage = batch[-1].usage if stream else batch.usage
    assert usage.prompt_tokens == len(ids) + len(tok.encode("Numbers: 0 1 2"))
    assert usage.completion_tokens == 4 * 5
    echoed = run(prompt=text_prompt, max_tokens=3, temperature=0, echo=True, logprobs=2)
    assert texts(echoed)[0].startswith(text_prompt)
    if not stream:
        lp = echoed.choices[0].logprobs
        assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids) + 3
        assert all(v <= 0 for v in lp.token_logprobs[1:]) and "".join(lp.tokens) == \
            echoed.choices[0].text  # fmt: skip
        assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
        assert lp.text_offset[:2] == [0, len(lp.tokens[0])]
    code, body = post(stack, "/v1/completions", {"model": m, "prompt": "a", "suffix": "b"})
    assert code == 400 and "suffix" in body["error"]["message"]
    for bad in ({"prompt": []}, {"prompt": [[]]}, {"prompt": [1, "a"]}, {"prompt": [10**6]},
                {"prompt": "a", "logprobs": 99}, {"prompt": "a", "guided_regex": "("}):  # fmt: skip
        code, body = post(stack, "/v1/completions", {"model": m, **bad})
        assert code == 400, (bad, body)


def test_tokenize_and_detokenize_as_vllm(stack, tiny_model):
    from common.tokenizer import ChatTokenizer

    tok = ChatTokenizer(tiny_model)
    code, body = post(stack, "/tokenize", {"model": name(stack), "prompt": "Hello there"})
    assert code == 200 and body["tokens"] == tok.encode("Hello there")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] > 0
    code, back = post(stack, "/detokenize", {"model": name(stack), "tokens": body["tokens"]})
    assert code == 200 and back == {"prompt": "Hello there"}
    code, strs = post(stack, "/tokenize", {"prompt": "Hello", "return_token_strs": True})
    assert "".join(strs["token_strs"]) == "Hello"
    assert post(stack, "/detokenize", {"tokens": [10**7]})[0] == 400
    assert post(stack, "/tokenize", {"model": "nope", "prompt": "x"})[0] == 404


def test_grpc_chat_takes_the_same_fields(stack):
    import grpc

    from common.rpc import gateway_pb2, gateway_pb2_grpc

    def complete(**kw) -> list:
        request = gateway_pb2.ChatRequest(
            messages=[gateway_pb2.Message(role="user", content=[gateway_pb2.Part(text="Hi")])],
            max_tokens=200, temperature=1.0, seed=2, **kw,
        )  # fmt: skip
        with grpc.insecure_channel(stack.gateway_grpc) as channel:
            stub = gateway_pb2_grpc.ChatStub(channel)
            return list(stub.Complete(request, metadata=[("authorization", f"Bearer {KEY}")]))

    replies = complete(n=2, constraint=gateway_pb2.Constraint(
        choice=gateway_pb2.Choices(values=["left", "right"])))  # fmt: skip
    texts: dict[int, str] = {}
    for r in replies:
        if r.HasField("delta"):
            texts[r.delta.index] = texts.get(r.delta.index, "") + r.delta.text
    assert sorted(texts) == [0, 1] and set(texts.values()) <= {"left", "right"}
    assert sorted(r.done.index for r in replies if r.HasField("done")) == [0, 1]
    replies = complete(tools_json=json.dumps([WEATHER]), tool_choice="get_weather")
    calls = [tc for r in replies if r.HasField("delta") for tc in r.delta.tool_calls]
    assert calls[0].name == "get_weather" and calls[0].id
    jsonschema.validate(json.loads("".join(c.arguments for c in calls)),
                        WEATHER["function"]["parameters"])  # fmt: skip
    assert replies[-1].done.finish_reason == "tool_calls"
    with pytest.raises(grpc.RpcError) as err:
        complete(constraint=gateway_pb2.Constraint(regex="(("))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "regex" in err.value.details()
