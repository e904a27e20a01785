"""Incremental detokenization with stop strings.

The text of a response is exactly the tokenizer's decode of all generated ids (special tokens
skipped). Each step decodes only a short window, not the whole output (which made the gateway's
cost per token grow with the output length): `_window` is the start of the last token's
context, `_read` the end of the tokens whose text is already in `_text`. The new tokens' text is
decode(ids[window:]) minus decode(ids[window:read]), taken only when it does not end in U+FFFD
(an incomplete UTF-8 sequence, as byte-level BPE splits characters across tokens, that a later
token may complete). The context token keeps what a decoder does at a token boundary (leading
spaces, merged bytes) as the full decode does it.

Streamed deltas also hold back a tail that is a prefix of a stop string, which the next token
may complete into a stop. `finish()` flushes what is held back, so the concatenated deltas equal
the final text.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.tokenizer import ChatTokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: ChatTokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self._window = 0  # first id of the decode window (context for the next ids)
        self._read = 0  # ids before this index have their text in `_text`
        self._text = ""  # decode of ids[:_read], cut at a stop string once one is found
        self.sent = 0  # characters of the text already returned as deltas
        self.stopped = False  # a stop string was found; the text ends before it

    def add(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the new stable text (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        self._advance(final=False)
        if self.stopped:
            return self._take(self._text)
        return self._take(self._text[: len(self._text) - self._stop_prefix_len(self._text)])

    def finish(self) -> str:
        """Everything not yet returned (the final flush)."""
        if not self.stopped:
            self._advance(final=True)
        return self._take(self._text)

    @property
    def text(self) -> str:
        """The text so far (without a still-incomplete character at the end)."""
        return self._text

    def _advance(self, final: bool) -> None:
        """Move the ids decoded since `_read` into `_text`, unless they end mid-character
        (`final` takes them anyway); then look for a stop string in what could now hold one."""
        if self._read == len(self.ids):
            return
        decode = self.tokenizer.decode
        before = decode(self.ids[self._window : self._read], skip_special_tokens=True)
        after = decode(self.ids[self._window :], skip_special_tokens=True)
        if after.endswith(REPLACEMENT) and not final:
            return
        old = len(self._text)
        self._text += after[len(before) :]
        self._window, self._read = self._read, len(self.ids)
        # Only a stop string overlapping the new text can be new.
        start = max(0, old - self._longest_stop + 1)
        cut = min((i for s in self.stop if (i := self._text.find(s, start)) >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._text = self._text[:cut]

    def _take(self, text: str) -> str:
        delta = text[self.sent :]
        self.sent = max(self.sent, len(text))
        return delta

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
