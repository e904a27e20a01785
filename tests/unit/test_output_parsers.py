"""The gateway's parsing of requests and replies beyond plain chats, without a model: structured
output spellings, tool choices, Qwen3's `<tool_call>` blocks and `<think>` blocks, streamed in
every split and whole."""

from __future__ import annotations

import json

import pytest

from common.contract import ConstraintKind, SamplingParams, StructuredOutput
from common.contract.wire import sampling_from_proto, sampling_to_proto
from services.gateway.reasoning import ReasoningParser
from services.gateway.structured_outputs import SpecError, parse_structured
from services.gateway.tools import (
    HermesParser,
    NamedParser,
    RequiredParser,
    ToolError,
    parse_tools,
)

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
REPLY = (
    'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
    '"days": [1, 2], "opts": {"a": "}"}}}\n</tool_call>\n<tool_call>\n{"name": "g", '
    '"arguments": {}}\n</tool_call>'
)


def feed_all(parser, text: str, step: int):
    pieces = []
    for i in range(0, len(text), step):
        pieces += parser.feed(text[i : i + step])
    return pieces + parser.finish()


@pytest.mark.parametrize("step", [1, 2, 5, 13, 1000])
def test_hermes_blocks_stream_as_openai_tool_call_chunks(step):
    p = HermesParser()
    pieces = feed_all(p, REPLY, step)
    content = "".join(x.get("content", "") for x in pieces)
    calls: dict[int, dict] = {}
    for x in pieces:
        for tc in x.get("tool_calls", []):
            c = calls.setdefault(tc["index"], {"names": [], "arguments": ""})
            if "id" in tc:
                c["names"].append(tc["function"]["name"])
            c["arguments"] += tc["function"]["arguments"]
    assert content == p.content == "Let me check."
    assert [c["names"] for c in calls.values()] == [["get_weather"], ["g"]]  # each name once
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "days": [1, 2],
                                                 "opts": {"a": "}"}}  # fmt: skip
    assert [(c.name, c.arguments) for c in p.calls] == [
        ("get_weather", calls[0]["arguments"]), ("g", "{}")]  # fmt: skip


def test_text_that_is_no_call_stays_content():
    p = HermesParser()
    text = "a < b and <tool_call>not json</tool_call> c <tool"
    assert "".join(x.get("content", "") for x in feed_all(p, text, 3)) == text
    assert p.calls == []


def test_forced_choices_parse_their_json():
    named = NamedParser("f")
    pieces = feed_all(named, '{"x": 1}', 2)
    assert pieces[0]["tool_calls"][0]["function"]["name"] == "f"
    assert named.calls[0].arguments == '{"x": 1}'
    required = RequiredParser()
    feed_all(required, '[{"name": "f", "parameters": {"x": "]"}}, {"name": "g", '
             '"parameters": {}}]', 1)  # fmt: skip
    assert [(c.name, json.loads(c.arguments)) for c in required.calls] == [
        ("f", {"x": "]"}), ("g", {})]  # fmt: skip


def test_tool_choice_becomes_the_schema_vllm_uses():
    named = parse_tools(
        {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}}}
    )
    assert named is not None and json.loads(named.schema().spec) == {"type": "object"}
    required = parse_tools({"tools": [TOOL], "tool_choice": "required",
                            "parallel_tool_calls": False})  # fmt: skip
    assert required is not None
    schema = json.loads(required.schema().spec)
    assert schema["type"] == "array" and schema["minItems"] == schema["maxItems"] == 1
    assert parse_tools({"tools": [TOOL]}).mode == "auto"  # type: ignore[union-attr]
    assert parse_tools({}) is None
    for body in ({"tools": [TOOL, TOOL]}, {"tools": "x"}, {"tool_choice": "required"},
                 {"tools": [TOOL], "tool_choice": "sometimes"},
                 {"tools": [TOOL], "parallel_tool_calls": 1}):  # fmt: skip
        with pytest.raises(ToolError):
            parse_tools(body)


@pytest.mark.parametrize("step", [1, 3, 100])
def test_think_blocks_become_reasoning_content(step):
    def split(prompt: str, text: str, enabled: bool = True):
        p = ReasoningParser(prompt, enabled)
        pieces = feed_all(p, text, step)
        return ("".join(x.get("reasoning_content", "") for x in pieces),
                "".join(x.get("content", "") for x in pieces))  # fmt: skip

    assert split("<|im_start|>assistant\n", "<think>why</think>\n\nanswer") == ("why", "\n\nanswer")
    assert split("assistant\n<think>\n", "why</think>answer") == ("why", "answer")
    assert split("assistant\n<think>\n", "still thinking") == ("still thinking", "")
    assert split("assistant\n", "no tags </b>") == ("", "no tags </b>")
    assert split("assistant\n<think>\n\n</think>\n\n", "a</think>b") == ("", "a</think>b")
    assert split("assistant\n", "<think>x</think>y", enabled=False) == ("", "<think>x</think>y")


def test_structured_output_spellings_and_their_errors():
    s = parse_structured({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object"}, "strict": False}}})  # fmt: skip
    assert s is not None and s.kind == ConstraintKind.JSON_SCHEMA and not s.strict
    assert parse_structured({"response_format": {"type": "text"}}) is None
    assert parse_structured({"structured_outputs": {"choice": ["a", "b"], "backend": "auto"}}) \
        == StructuredOutput(ConstraintKind.CHOICE, choices=("a", "b"))  # fmt: skip
    assert parse_structured({"guided_regex": "a+"}).kind == ConstraintKind.REGEX  # type: ignore
    assert parse_structured({"guided_grammar": 'root ::= "a"'}).kind == ConstraintKind.GRAMMAR
    for body in ({"response_format": {"type": "json_schema"}},
                 {"structured_outputs": {"regex": 3}},
                 {"structured_outputs": {"regex": "a", "grammar": "b"}},
                 {"structured_outputs": {"whitespace_pattern": " "}},
                 {"guided_json": "[", "guided_regex": "a"},
                 {"guided_choice": ["a", 1]},
                 {"guided_decoding_backend": "outlines", "guided_regex": "a"}):  # fmt: skip
        with pytest.raises(SpecError):
            parse_structured(body)


def test_the_new_sampling_fields_cross_the_wire():
    for s in (StructuredOutput.json_schema({"type": "object"}, strict=False),
              StructuredOutput(ConstraintKind.JSON_OBJECT),
              StructuredOutput(ConstraintKind.REGEX, "a+", after_token=5),
              StructuredOutput(ConstraintKind.CHOICE, choices=("x", "y z")),
              StructuredOutput(ConstraintKind.GRAMMAR, 'root ::= "a"')):  # fmt: skip
        p = SamplingParams(n=3, prompt_logprobs=2, structured=s)
        assert sampling_from_proto(sampling_to_proto(p)) == p
    assert sampling_from_proto(sampling_to_proto(SamplingParams())) == SamplingParams()


def test_a_prompt_that_opens_a_think_block_frees_the_reasoning(tiny_model):
    """With a reasoning parser, a constraint waits for `</think>` when the reply starts inside
    a think block (a Thinking checkpoint's template opens it), and only then."""
    from common.config import ModelConfig
    from common.tokenizer import ChatTokenizer
    from services.gateway.metrics import GatewayMetrics
    from services.gateway.openai_protocol import ChatRequest
    from services.gateway.orchestrator import Orchestrator, OrchestratorConfig

    tok = ChatTokenizer(tiny_model)
    cfg = ModelConfig.from_dir(tiny_model)

    def gated(prompt: str, parser: str | None = "qwen3", **kwargs) -> int | None:
        o = Orchestrator(cfg, tok, None, None, GatewayMetrics(),  # type: ignore[arg-type]
                         OrchestratorConfig(reasoning_parser=parser))  # fmt: skip
        spec = StructuredOutput(ConstraintKind.REGEX, "a+")
        req = ChatRequest("m", [], [], SamplingParams(structured=spec), template_kwargs=kwargs)
        req.prompt_text = prompt
        o._free_reasoning(req)
        assert req.params.structured is not None
        return req.params.structured.after_token

    end = tok.token_id("</think>")
    assert gated("<|im_start|>assistant\n<think>\n") == end
    assert gated("<|im_start|>assistant\n") is None
    assert gated("assistant\n<think>\n\n</think>\n\n") is None  # enable_thinking false
    assert gated("assistant\n<think>\n", enable_thinking=False) is None
    assert gated("assistant\n<think>\n", parser=None) is None
