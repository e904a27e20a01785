"""Sampling parameters and finish reasons, as every role reads them (pure Python, no torch).

`SamplingParams` validates itself once, when it is built: strict types (a bool is not a number, a
float is not an integer) and ranges. The gateway builds it from a client's JSON, the language
servicer from the wire (`common.contract.wire`); the engine and the sampler trust it. A bad value
raises `ContractError`, whose `param` names the field (OpenAI's error `param`).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

from common.contract.errors import ContractError
from common.contract.structured import StructuredOutput

MAX_INT = (1 << 31) - 1  # counts and ids on the wire are uint32; nothing sane comes near
MAX_SEED = (1 << 64) - 1
MAX_STOP_TOKEN_IDS = 256
MAX_LOGPROBS = 20
MAX_N = 64  # sequences from one prompt
# Temperatures below this sample greedily (as vLLM's _SAMPLING_EPS): dividing logits by a
# denormal temperature overflows to inf, and the softmax of that is NaN.
GREEDY_TEMPERATURE = 1e-5


class FinishReason(enum.StrEnum):
    STOP = "stop"  # an end-of-sequence or stop token (or, at the gateway, a stop string)
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # the caller cancelled
    ERROR = "error"  # the service failed while generating


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request samples. `max_tokens=None` means up to the replica's `max_model_len`;
    the language service resolves it when it admits the request."""

    max_tokens: int | None = 16
    temperature: float = 0.0  # 0 (below GREEDY_TEMPERATURE) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # top alternatives to report per token; None = off
    # Report each prompt token's log-probability and this many alternatives; None = off. Such
    # a request computes its whole prompt (no prefix-cache hits: the cache keeps no logits).
    prompt_logprobs: int | None = None
    n: int = 1  # sequences from this prompt (prefilled once; each its own seed stream)
    structured: StructuredOutput | None = None  # what the output must match; None = anything

    def __post_init__(self) -> None:
        if self.max_tokens is not None:
            _int("max_tokens", self.max_tokens, 1, MAX_INT)
        _number("temperature", self.temperature, 0.0, 2.0)
        _number("top_p", self.top_p, 0.0, 1.0, open_low=True)
        _int("top_k", self.top_k, 0, MAX_INT)
        _number("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            _int("seed", self.seed, 0, MAX_SEED)
        _number("repetition_penalty", self.repetition_penalty, 0.0, 10.0, open_low=True)
        _number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if not isinstance(self.stop_token_ids, tuple):
            raise ContractError("stop_token_ids must be a list of token ids", "stop_token_ids")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ContractError(
                f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids", "stop_token_ids"
            )
        for t in self.stop_token_ids:
            _int("stop_token_ids", t, 0, MAX_INT)
        if not isinstance(self.ignore_eos, bool):
            raise ContractError("ignore_eos must be a boolean", "ignore_eos")
        _int("min_tokens", self.min_tokens, 0, MAX_INT)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ContractError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                "min_tokens",
            )
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS)
        _int("n", self.n, 1, MAX_N)
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise ContractError("structured must be a StructuredOutput", "structured_outputs")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids the parameters name must exist in the model's vocabulary."""
        check_token_ids(self.stop_token_ids, vocab_size, "stop_token_ids")
        if self.structured is not None and self.structured.after_token is not None:
            check_token_ids([self.structured.after_token], vocab_size, "structured_outputs")


def check_token_ids(ids: Any, vocab_size: int, param: str) -> None:
    for t in ids:
        if not 0 <= t < vocab_size:
            raise ContractError(
                f"{param}: token id {t} is outside the vocabulary [0, {vocab_size})", param
            )


def _int(name: str, v: Any, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ContractError(f"{name} must be an integer, got {_show(v)}", name)
    if not lo <= v <= hi:
        raise ContractError(f"{name} must be in [{lo}, {hi}], got {v}", name)


def _number(name: str, v: Any, lo: float, hi: float, open_low: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ContractError(f"{name} must be a number, got {_show(v)}", name)
    low_ok = v > lo if open_low else v >= lo
    if not (math.isfinite(v) and low_ok and v <= hi):
        bracket = "(" if open_low else "["
        raise ContractError(f"{name} must be in {bracket}{lo:g}, {hi:g}], got {v!r}", name)


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."
