"""What runs next (pure Python): continuous batching with chunked prefill and preemption.

Each step gets a token budget (`max_batch_tokens`). Running requests go first, oldest first: a
decoding request takes 1 token, a request still in prefill takes the next chunk of its prompt
that fits. Then waiting requests are admitted in arrival order while the budget, `max_num_seqs`
and free KV blocks allow; a new request first takes its prefix-cache hits. While any request is
decoding, the prefill chunks of a step share a smaller budget (`prefill_budget_with_decodes`),
so that a burst of arriving prompts cannot stretch the step every decoding request waits on
(its TPOT); with nothing decoding, prefill takes the whole step. When a running request
needs a block and none is free, the newest running request is preempted (its blocks freed; it
is recomputed later from all its tokens).

The n sequences of one request share its prompt: the first is admitted as any request, the
others wait (in arrival order, holding back those behind them) until its prompt is computed,
then take its full blocks from the prefix cache. A request that wants prompt logprobs takes no
prefix-cache hits (the cache holds K/V, not the logits it needs).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from common.contract import FinishReason
from services.language.engine.kv_cache import BlockManager
from services.language.engine.request import Request, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_batch_tokens: int = 2048
    max_waiting: int = 1024  # beyond this, new requests are refused (RESOURCE_EXHAUSTED)
    # Prompt tokens per step while some request decodes; None = up to max_batch_tokens.
    prefill_budget_with_decodes: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0 or self.max_batch_tokens <= 0 or self.max_waiting <= 0:
            raise ValueError("max_num_seqs, max_batch_tokens and max_waiting must be positive")
        if self.prefill_budget_with_decodes is not None and self.prefill_budget_with_decodes <= 0:
            raise ValueError("prefill_budget_with_decodes must be positive")


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    req: Request
    start: int  # first token index computed this step
    length: int  # tokens computed this step

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the request's last token, so a new token is sampled."""
        return self.start + self.length == self.req.num_tokens


def _decoding(req: Request) -> bool:
    """Whether `req` is past its prompt, with one token (its last sampled) to compute."""
    return req.num_computed >= req.num_prompt and req.num_pending == 1


class QueueFull(Exception):
    """Too many waiting requests."""


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, blocks: BlockManager) -> None:
        self.cfg = cfg
        self.blocks = blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, req: Request) -> None:
        if len(self.waiting) >= self.cfg.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests already waiting")
        req.status = Status.WAITING
        self.waiting.append(req)

    def abort(self, req_id: str) -> Request | None:
        """Remove a request wherever it is; frees its blocks at once."""
        for req in self.running:
            if req.id == req_id:
                self.running.remove(req)
                return self._finish(req, FinishReason.ABORT)
        for req in self.waiting:
            if req.id == req_id:
                self.waiting.remove(req)
                return self._finish(req, FinishReason.ABORT)
        return None

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.cfg.max_batch_tokens
        chunks: list[ScheduledChunk] = []
        cap = self.cfg.prefill_budget_with_decodes
        prefill = budget if cap is None or not any(map(_decoding, self.running)) else cap
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            decoding = _decoding(req)
            n = min(req.num_pending, budget, budget if decoding else prefill)
            if n == 0 or not self._grow(req, req.num_computed + n):
                continue
            chunks.append(ScheduledChunk(req, req.num_computed, n))
            budget -= n
            if not decoding:
                prefill -= n
        while (self.waiting and min(budget, prefill) > 0
               and len(self.running) < self.cfg.max_num_seqs):  # fmt: skip
            req = self.waiting[0]
            if req.follows is not None and not req.follows.prompt_computed:
                break  # its prompt's blocks come from the sequence it follows
            hits = [] if req.params.prompt_logprobs is not None else self.blocks.match_prefix(req)
            computed = len(hits) * self.blocks.block_size
            n = min(req.num_tokens - computed, budget, prefill)
            extra = self.blocks.blocks_for(computed + n) - len(hits)
            if extra > self.blocks.num_free - sum(
                1 for h in hits if self.blocks.blocks[h].ref == 0
            ):
                break  # no room now; keep arrival order
            self.waiting.popleft()
            self.blocks.admit(req, hits)
            if req.num_preemptions == 0:
                req.num_cached_prompt = min(req.num_computed, req.num_prompt)
            self.blocks.ensure(req, computed + n)
            req.status = Status.RUNNING
            self.running.append(req)
            chunks.append(ScheduledChunk(req, computed, n))
            budget -= n
            prefill -= n
        return chunks

    def postprocess(
        self, chunks: list[ScheduledChunk], sampled: dict[str, int]
    ) -> list[tuple[Request, int, FinishReason | None]]:
        """Advance computed counts, append sampled tokens. Returns (req, token, finish_reason)."""
        out = []
        for chunk in chunks:
            req = chunk.req
            if req.status is not Status.RUNNING:  # aborted while the step ran
                continue
            req.num_computed = chunk.start + chunk.length
            self.blocks.commit(req)
            if not chunk.samples:
                continue
            token = sampled[req.id]
            reason = req.append_token(token)
            if reason is not None:
                self.running.remove(req)
                self._finish(req, reason)
            out.append((req, token, reason))
        return out

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Make room for `num_tokens` in `req`, preempting newer requests; False if `req` itself
        had to be preempted."""
        while not self.blocks.can_ensure(req, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        self.blocks.ensure(req, num_tokens)
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.release(req)
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _finish(self, req: Request, reason: FinishReason) -> Request:
        self.blocks.release(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
        return req
