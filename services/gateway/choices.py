"""One chat choice's output: reasoning, content and tool calls, streamed or whole.

The generated text goes through the reasoning parser first (`--reasoning-parser`), and what it
leaves as content through the request's tool-call parser (`tools.py`). `feed` returns OpenAI
delta pieces (`{"reasoning_content": ...}`, `{"content": ...}`, `{"tool_calls": [...]}`); the
non-streaming message is the same text parsed whole.
"""

from __future__ import annotations

from typing import Any

from services.gateway.openai_protocol import ChatRequest
from services.gateway.reasoning import ReasoningParser
from services.gateway.tools import parser_for


class ChoiceOutput:
    def __init__(self, req: ChatRequest, reasoning_parser: str | None) -> None:
        self.reasoning = None
        if reasoning_parser is not None:
            enabled = req.template_kwargs.get("enable_thinking") is not False
            self.reasoning = ReasoningParser(req.prompt_text, enabled)
        self.calls = parser_for(req.tools)
        self.content = ""  # when no tool parser runs

    def feed(self, text: str) -> list[dict[str, Any]]:
        pieces = self.reasoning.feed(text) if self.reasoning else [{"content": text}]
        return self._route(pieces)

    def finish(self) -> list[dict[str, Any]]:
        out = self._route(self.reasoning.finish()) if self.reasoning else []
        if self.calls is not None:
            out += self.calls.finish()
        return out

    def _route(self, pieces: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for p in pieces:
            text = p.get("content")
            if text is None:
                out.append(p)
            elif self.calls is not None:
                out += self.calls.feed(text)
            elif text:
                self.content += text
                out.append(p)
        return out

    @property
    def called(self) -> bool:
        return self.calls is not None and bool(self.calls.calls)

    def message(self) -> dict[str, Any]:
        """The whole choice's message (after `finish`)."""
        msg: dict[str, Any] = {"role": "assistant"}
        if self.calls is not None:
            msg["content"] = self.calls.content or (None if self.calls.calls else "")
            if self.calls.calls:
                msg["tool_calls"] = [c.json() for c in self.calls.calls]
        else:
            msg["content"] = self.content
        if self.reasoning is not None:
            msg["reasoning_content"] = self.reasoning.reasoning or None
        return msg

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.called and reason == "stop" else reason
