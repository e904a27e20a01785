"""Tool calling: `tools` and `tool_choice` in, OpenAI `tool_calls` out, as vLLM serves them.

The chat template renders the tools (Qwen3's template lists them in the system turn and asks for
`<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks, vLLM's `hermes` format).

- `auto`: the reply is parsed for those blocks (`HermesParser`): text outside them is content,
  each block one call; streamed, a call's name goes out once and its arguments as they grow.
- `required` and a named function are enforced by structured decoding, as vLLM does it: the
  named function's parameters schema is the output's JSON schema, and the output is that call's
  arguments; `required` makes the output a JSON array of `{"name", "parameters"}` objects, one of
  the tools each (at most one when `parallel_tool_calls` is false). Arguments therefore always
  parse and validate.
- `none`: the tools are rendered, the reply is not parsed.

A reply with calls ends with finish_reason "tool_calls".
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from common.contract import StructuredOutput

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_MAX_TOOLS = 128


class ToolError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolChoice:
    """What the request's tools may do: mode "none", "auto", "required" or "named"."""

    mode: str
    tools: tuple[dict[str, Any], ...]  # as the client sent them ({"type": "function", ...})
    name: str = ""  # mode "named"
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")

    def schema(self) -> StructuredOutput:
        """The structured-output constraint of a forced choice."""
        if self.mode == "named":
            return StructuredOutput.json_schema(_parameters(self._function(self.name)))
        items = [
            {"type": "object", "properties": {"name": {"type": "string", "enum": [f["name"]]},
                                              "parameters": _parameters(f)},
             "required": ["name", "parameters"]}
            for f in (t["function"] for t in self.tools)
        ]  # fmt: skip
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutput.json_schema(schema)

    def _function(self, name: str) -> dict[str, Any]:
        return next(t["function"] for t in self.tools if t["function"]["name"] == name)


def parse_tools(body: dict[str, Any]) -> ToolChoice | None:
    """The request's tools and choice, or None without tools; raises ToolError (400)."""
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise ToolError("functions/function_call are deprecated: use tools/tool_choice",
                        "functions")  # fmt: skip
    tools = body.get("tools")
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ToolError("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise ToolError("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > _MAX_TOOLS:
        raise ToolError(f"tools must be a list of at most {_MAX_TOOLS} tools", "tools")
    names: set[str] = set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function":
            raise ToolError(f'{where} must be {{"type": "function", "function": {{...}}}}', "tools")
        f = t.get("function")
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise ToolError(f"{where}.function.name must be a non-empty string", "tools")
        if f.get("description") is not None and not isinstance(f["description"], str):
            raise ToolError(f"{where}.function.description must be a string", "tools")
        if f.get("parameters") is not None and not isinstance(f["parameters"], dict):
            raise ToolError(f"{where}.function.parameters must be a JSON schema object", "tools")
        if f.get("strict") is not None and not isinstance(f["strict"], bool):
            raise ToolError(f"{where}.function.strict must be a boolean", "tools")
        if f["name"] in names:
            raise ToolError(f"{where}: two tools are named {f['name']!r}", "tools")
        names.add(f["name"])
    frozen = tuple(tools)
    if choice is None or choice in ("auto", "none", "required"):
        mode = "auto" if choice is None else choice
        return ToolChoice(mode, frozen, parallel=parallel is not False)
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if not isinstance(name, str) or name not in names:
            raise ToolError(f"tool_choice names no tool in tools: {name!r}", "tool_choice")
        return ToolChoice("named", frozen, name, parallel is not False)
    raise ToolError('tool_choice must be "none", "auto", "required" or '
                    '{"type": "function", "function": {"name": ...}}', "tool_choice")  # fmt: skip


def _parameters(f: dict[str, Any]) -> dict[str, Any]:
    p = f.get("parameters")
    return p if isinstance(p, dict) else {"type": "object", "properties": {}}


def new_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=new_call_id)

    def json(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}  # fmt: skip


class CallParser:
    """One choice's text in, content and tool calls out, incrementally. `feed` returns the
    OpenAI delta pieces its text completes ({"content": ...} or {"tool_calls": [...]}),
    `finish` the rest; `calls` and `content` are the whole reply's."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self.content = ""

    def feed(self, text: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    def finish(self) -> list[dict[str, Any]]:
        return []

    def _content(self, text: str) -> list[dict[str, Any]]:
        if not text or (self.calls and not text.strip()):  # blank space between calls
            return []
        self.content += text
        return [{"content": text}]

    def _call_head(self, call: ToolCall) -> dict[str, Any]:
        index = len(self.calls)
        self.calls.append(call)
        return {"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                "function": {"name": call.name, "arguments": ""}}]}  # fmt: skip

    def _arguments(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        self.calls[-1].arguments += text
        index = len(self.calls) - 1
        return [{"tool_calls": [{"index": index, "function": {"arguments": text}}]}]


class HermesParser(CallParser):
    """`auto`: `<tool_call>{"name": N, "arguments": A}</tool_call>` blocks in free text."""

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""  # text not yet classified
        self._block: str | None = None  # inside a block: its text so far
        self._sent = 0  # characters of the current block's arguments already sent
        self._named = False  # the current block's call has gone out (its name parsed)

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._buf += text
        out: list[dict[str, Any]] = []
        while True:
            if self._block is None:
                at = self._buf.find(TOOL_CALL_START)
                if at < 0:
                    keep = _prefix_len(self._buf, TOOL_CALL_START)
                    out += self._content(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    return out
                out += self._content(self._buf[:at])
                self._buf = self._buf[at + len(TOOL_CALL_START) :]
                self._block, self._sent, self._named = "", 0, False
                continue
            end = self._buf.find(TOOL_CALL_END)
            if end < 0:
                keep = _prefix_len(self._buf, TOOL_CALL_END)
                self._block += self._buf[: len(self._buf) - keep]
                self._buf = self._buf[len(self._buf) - keep :]
                out += self._stream_block(final=False)
                return out
            self._block += self._buf[:end]
            self._buf = self._buf[end + len(TOOL_CALL_END) :]
            out += self._stream_block(final=True)
            self._block = None

    def finish(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self._block is not None:  # an unterminated block: a call if it parses
            out += self._stream_block(final=True)
            self._block = None
        out += self._content(self._buf)
        self._buf = ""
        return out

    def _stream_block(self, final: bool) -> list[dict[str, Any]]:
        block = self._block or ""
        head = _HEAD.match(block)
        out: list[dict[str, Any]] = []
        if head is not None and not self._named:
            try:
                name = json.loads(f'"{head.group(1)}"')
            except json.JSONDecodeError:
                name = head.group(1)
            out.append(self._call_head(ToolCall(name, "")))
            self._named = True
        if not self._named:
            if final:  # not a call after all: its text is content, as vLLM gives it back
                out += self._content(TOOL_CALL_START + block + TOOL_CALL_END)
            return out
        assert head is not None
        args = block[head.end() :]
        if final:
            try:
                _, stop = json.JSONDecoder().raw_decode(args)
                exact = args[:stop]
            except json.JSONDecodeError:
                exact = args.rstrip().removesuffix("}").rstrip()
            out += self._arguments(exact[self._sent :])
            self._sent = 0
            return out
        # While streaming, hold back what may be the block's closing brace and blank space.
        hold = len(args) - len(args.rstrip())
        if args.rstrip().endswith("}"):
            hold = len(args) - len(args.rstrip()[:-1].rstrip())
        ready = args[: len(args) - hold]
        out += self._arguments(ready[self._sent :])
        self._sent = max(self._sent, len(ready))
        return out


class NamedParser(CallParser):
    """A named tool choice: the whole output is that call's arguments."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._head: dict[str, Any] | None = self._call_head(ToolCall(name, ""))

    def feed(self, text: str) -> list[dict[str, Any]]:
        out = [self._head] if self._head is not None else []
        self._head = None
        return out + self._arguments(text)

    def finish(self) -> list[dict[str, Any]]:
        out = [self._head] if self._head is not None else []
        self._head = None
        return out


class RequiredParser(CallParser):
    """`required`: the output is a JSON array of {"name", "parameters"}; each element is a call,
    sent whole once it is complete."""

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""
        self._pos = 0  # where the next element may start

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._buf += text
        out: list[dict[str, Any]] = []
        decoder = json.JSONDecoder()
        while True:
            rest = self._buf[self._pos :]
            skip = len(rest) - len(rest.lstrip(" \t\r\n[,"))
            start = self._pos + skip
            try:
                value, end = decoder.raw_decode(self._buf, start)
            except json.JSONDecodeError:
                return out
            self._pos = end
            if isinstance(value, dict) and isinstance(value.get("name"), str):
                args = json.dumps(value.get("parameters", {}), ensure_ascii=False)
                call = ToolCall(value["name"], "")
                out.append(self._call_head(call))
                out += self._arguments(args)


def parser_for(choice: ToolChoice | None) -> CallParser | None:
    if choice is None or choice.mode == "none":
        return None
    if choice.mode == "named":
        return NamedParser(choice.name)
    if choice.mode == "required":
        return RequiredParser()
    return HermesParser()


def _prefix_len(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
