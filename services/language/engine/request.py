"""Request state (pure Python, no torch); its `SamplingParams` come from the shared contract.

A request's tokens are its prompt followed by what it generated. `num_computed` counts tokens
whose K/V are in the cache (prefix-cache hits included); the scheduler advances it by the chunk it
runs each step. Preemption frees the blocks and resets `num_computed` to 0: the request is
recomputed later from all its tokens (prompt + output so far).

A request with a structured-output constraint carries its grammar state (`constraint`), advanced
by `append_token` with each token the request keeps, and only there: recomputing a preempted
request's tokens does not append them again, so the grammar state stays where it was.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

from common.contract import FinishReason, SamplingParams


class TokenConstraint(Protocol):
    """A grammar's state for one sequence (`grammar.GrammarConstraint`)."""

    def accept(self, token: int) -> bool:
        """Advance by `token`; False when the grammar does not allow it."""
        ...

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows no further token."""
        ...


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class ImageSpan:
    """Where one image's rows sit in the prompt, and what identifies its content."""

    start: int  # index of its first image-pad token
    length: int  # number of image-pad tokens (= rows of its wire tensor)
    identity: bytes  # 16-byte digest of the tensor bytes and grid (`inputs.image_identity`)


@dataclass(eq=False)
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams  # max_tokens resolved (never None here)
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
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    constraint: TokenConstraint | None = None
    # n > 1: the sequences after the first wait for it, whose prompt they share; they are
    # admitted once its prompt's full blocks are in the prefix cache (`prompt_computed`).
    follows: Request | None = None
    index: int = 0  # this sequence's place among the request's n
    # prompt_logprobs: (logprob, top alternatives) of prompt tokens 1.., filled as chunks run.
    prompt_logprobs: list[tuple[float, tuple[tuple[int, float], ...]]] = field(default_factory=list)

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

    @property
    def prompt_computed(self) -> bool:
        """Whether the prompt's K/V are all in the cache (or never will be: finished)."""
        return self.finished or self.num_computed >= self.num_prompt

    def append_token(self, token: int) -> FinishReason | None:
        """Record a sampled token; return the finish reason if it ends the request."""
        self.output_ids.append(token)
        n = len(self.output_ids)
        # The sampler samples only tokens the grammar allows, so a refused token means the
        # grammar allowed none (a dead end in the client's grammar): the output ends there.
        c = self.constraint
        if c is not None and (not c.accept(token) or c.finished):
            return FinishReason.STOP
        stops = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            stops |= self.eos_token_ids
        if token in stops and n >= self.params.min_tokens:
            return FinishReason.STOP
        if self.params.max_tokens is not None and n >= self.params.max_tokens:
            return FinishReason.LENGTH
        return None
