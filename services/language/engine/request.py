"""Request state and sampling parameters (pure Python, no torch).

A request's tokens are its prompt followed by what it generated. `num_computed` counts tokens
whose K/V are in the cache (prefix-cache hits included); the scheduler advances it by the chunk it
runs each step. Preemption frees the blocks and resets `num_computed` to 0: the request is
recomputed later from all its tokens (prompt + output so far).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
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

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens > 0, f"max_tokens must be positive, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens must be in [0, max_tokens]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class ImageSpan:
    """Where one image's rows sit in the prompt, and what identifies its content."""

    start: int  # index of its first image-pad token
    length: int  # number of image-pad tokens (= rows of its wire tensor)
    content_hash: str


@dataclass(eq=False)
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    images: list[ImageSpan] = field(default_factory=list)
    eos_token_ids: frozenset[int] = frozenset()
    # Model-side inputs the runner prepares (embeddings, positions); opaque to the scheduler.
    payload: Any = None
    arrival: float = 0.0  # monotonic seconds
    first_token_at: float | None = None

    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached_prompt: int = 0  # prompt tokens served from the prefix cache at admission
    block_table: list[int] = field(default_factory=list)
    # Leading blocks of block_table registered in the prefix cache (registration is in order).
    num_registered_blocks: int = 0
    finish_reason: str | None = None
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the KV cache: the rest of the prompt, or the last sampled token."""
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token: int) -> str | None:
        """Record a sampled token; return the finish reason if it ends the request."""
        self.output_ids.append(token)
        n = len(self.output_ids)
        stops = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            stops |= self.eos_token_ids
        if token in stops and n >= self.params.min_tokens:
            return "stop"
        if n >= self.params.max_tokens:
            return "length"
        return None
