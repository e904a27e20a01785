"""`--reasoning-parser qwen3`: a reply's `<think>...</think>` as `reasoning_content`.

As vLLM's qwen3 parser: the text before `</think>` is reasoning (a leading `<think>` dropped),
the text after it content. Qwen3-VL-Thinking's template opens the think block in the prompt, so
its replies start inside it: whether a reply starts in reasoning is read from the prompt (it
ends inside an open `<think>`), or from the reply starting with `<think>`. A reply that never
closes its block is all reasoning (the thinking was cut short); with `enable_thinking: false`
in `chat_template_kwargs` there is no reasoning and everything is content.
"""

from __future__ import annotations

from typing import Any

THINK_START = "<think>"
THINK_END = "</think>"
PARSERS = ("qwen3",)


def reasoning_open(prompt: str, template_kwargs: dict[str, Any]) -> bool:
    """Whether a reply to this prompt starts inside a think block."""
    if template_kwargs.get("enable_thinking") is False:
        return False
    return prompt.rfind(THINK_START) > prompt.rfind(THINK_END)


class ReasoningParser:
    """One choice's text in, {"reasoning_content": ...} and {"content": ...} pieces out."""

    def __init__(self, prompt: str, enabled: bool = True) -> None:
        self.reasoning = ""
        self.inside = enabled and prompt.rfind(THINK_START) > prompt.rfind(THINK_END)
        self._enabled = enabled
        self._at_start = enabled  # a reply may still open its own block
        self._done = not enabled
        self._buf = ""

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self._done:
            return [{"content": text}] if text else []
        self._buf += text
        out: list[dict[str, Any]] = []
        if self._at_start and not self.inside:
            stripped = self._buf.lstrip()
            if THINK_START.startswith(stripped):
                return out  # may still become "<think>"
            self._at_start = False
            if stripped.startswith(THINK_START):
                self.inside = True
                self._buf = stripped[len(THINK_START) :]
            else:
                self._done = True
                rest, self._buf = self._buf, ""
                return [{"content": rest}]
        self._at_start = False
        at = self._buf.find(THINK_END)
        if at >= 0:
            out += self._reason(self._buf[:at])
            rest = self._buf[at + len(THINK_END) :]
            self._buf, self._done = "", True
            return out + ([{"content": rest}] if rest else [])
        keep = _prefix_len(self._buf, THINK_END)
        out += self._reason(self._buf[: len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep :]
        return out

    def finish(self) -> list[dict[str, Any]]:
        rest, self._buf = self._buf, ""
        if not rest:
            return []
        if self.inside and not self._done:
            return self._reason(rest)
        return [{"content": rest}]

    def _reason(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        self.reasoning += text
        return [{"reasoning_content": text}]


def _prefix_len(text: str, marker: str) -> int:
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
