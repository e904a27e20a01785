"""Incremental detokenization with stop strings.

The text of a response is exactly the tokenizer's decode of all generated ids (special tokens
skipped). While streaming, each step's delta is what that decode gained since the last delta,
minus two kinds of tail that may still change:

- trailing U+FFFD: an incomplete UTF-8 sequence (byte-level BPE splits characters across tokens)
  that the next token may complete;
- a tail that is a prefix of a stop string, which the next token may complete into a stop.

`finish()` flushes what is held back, so the concatenated deltas equal the final text.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.tokenizer import ChatTokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: ChatTokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already returned as deltas
        self.stopped = False  # a stop string was found; the text ends before it

    def add(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the new stable text (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        text = self._text()
        if self.stopped:
            return self._take(text)
        stable = len(text.rstrip(REPLACEMENT))
        stable = min(stable, len(text) - self._stop_prefix_len(text))
        return self._take(text[:stable])

    def finish(self) -> str:
        """Everything not yet returned (the final flush)."""
        return self._take(self._text())

    @property
    def text(self) -> str:
        return self._text()

    def _take(self, text: str) -> str:
        delta = text[self.sent :]
        self.sent = max(self.sent, len(text))
        return delta

    def _text(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for s in self.stop if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return text[:cut]
        return text

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
