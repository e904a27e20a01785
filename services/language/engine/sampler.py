"""Next-token sampling for a batch of rows, each with its own request's parameters.

Order (as vLLM applies them): penalties on the raw logits (repetition over prompt + output;
presence/frequency over the output), the min_tokens ban on stop ids, the grammar's token bitmask
for rows with a structured-output constraint (`grammar.py`: one batched fill on the CPU, applied
on the logits' device; where the ban and the grammar together leave no token, the grammar wins),
then greedy argmax at temperature 0, else temperature, top-k, top-p, min-p and a draw from the
request's own seeded generator. Logprobs are reported from the raw logits (log-softmax before any
processing).

Every tensor the sampler builds lives on the logits' device (`process_logits` is checked on the
`meta` device by a test): a penalty built on the CPU and applied to CUDA logits would fail the
whole step. Penalties and bans are applied to the whole batch at once with indexed ops; only the
draws of sampled rows are per row (each has its own generator).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.contract import SamplingParams
from services.language.engine.grammar import GrammarConstraint, apply_bitmask, fill_bitmasks


@dataclass(frozen=True, slots=True)
class SampleInput:
    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: list[int]
    output_ids: list[int]
    stop_ids: frozenset[int]  # eos + stop ids, banned while fewer than min_tokens were produced
    constraint: GrammarConstraint | None = None  # the request's grammar state, if any


@dataclass(frozen=True, slots=True)
class Sample:
    token: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


def sample_rows(logits: torch.Tensor, rows: list[SampleInput]) -> list[Sample]:
    """logits `[N, V]` (one row per entry of `rows`) -> one Sample per row."""
    raw_logprobs = None
    if any(r.params.logprobs is not None for r in rows):
        raw_logprobs = torch.log_softmax(logits.float(), dim=-1)
    scores = process_logits(logits, rows)
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    tokens: dict[int, int] = {}
    if greedy:
        picked = scores[greedy].argmax(dim=-1).tolist()  # one sync for every greedy row
        tokens = dict(zip(greedy, picked, strict=True))
    for i, row in enumerate(rows):
        if i not in tokens:
            tokens[i] = _draw(scores[i], row)
    out = []
    for i, row in enumerate(rows):
        token = tokens[i]
        if raw_logprobs is None or row.params.logprobs is None:
            out.append(Sample(token))
            continue
        lp = raw_logprobs[i]
        top: tuple[tuple[int, float], ...] = ()
        if row.params.logprobs:
            values, ids = lp.topk(row.params.logprobs)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        out.append(Sample(token, float(lp[token]), top))
    return out


def process_logits(logits: torch.Tensor, rows: list[SampleInput]) -> torch.Tensor:
    """Penalties and the min_tokens ban applied to `logits [N, V]`; returns new fp32 scores (the
    input itself when no row needs any, which is then never written)."""
    vocab = logits.shape[1]
    device = logits.device
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    counted = [
        i
        for i, r in enumerate(rows)
        if (r.params.presence_penalty or r.params.frequency_penalty) and r.output_ids
    ]
    banned = [
        (i, t)
        for i, r in enumerate(rows)
        if len(r.output_ids) < r.params.min_tokens
        for t in sorted(r.stop_ids)
        if t < vocab
    ]
    constrained = [
        i for i, r in enumerate(rows) if r.constraint is not None and r.constraint.active
    ]
    if not (rep or counted or banned or constrained):
        return logits if logits.dtype == torch.float32 else logits.float()
    scores = logits.float().clone()
    if rep:
        pairs = [
            (i, t) for i in rep for t in sorted(set(rows[i].prompt_ids) | set(rows[i].output_ids))
        ]
        r_idx, t_idx = _index(pairs, device)
        penalty = torch.tensor([rows[i].params.repetition_penalty for i, _ in pairs], device=device)
        picked = scores[r_idx, t_idx]
        scores[r_idx, t_idx] = torch.where(picked > 0, picked / penalty, picked * penalty)
    if counted:
        pairs = [(i, t) for i in counted for t in rows[i].output_ids if t < vocab]
        r_idx, t_idx = _index(pairs, device)
        counts = torch.zeros_like(scores)
        counts.index_put_((r_idx, t_idx), torch.ones(len(pairs), device=device), accumulate=True)
        n = len(rows)
        freq = torch.tensor([r.params.frequency_penalty for r in rows], device=device).view(n, 1)
        pres = torch.tensor([r.params.presence_penalty for r in rows], device=device).view(n, 1)
        scores -= freq * counts + pres * (counts > 0).float()
    if banned:
        r_idx, t_idx = _index(banned, device)
        scores[r_idx, t_idx] = float("-inf")
    if constrained:
        _constrain(logits, scores, rows, constrained, {i for i, _ in banned})
    return scores


def _constrain(
    logits: torch.Tensor,
    scores: torch.Tensor,
    rows: list[SampleInput],
    constrained: list[int],
    banned_rows: set[int],
) -> None:
    """The grammar bitmask on `scores [N, V]` (in place) for the constrained rows."""
    device = logits.device
    cs = [rows[i].constraint for i in constrained]
    assert all(c is not None for c in cs)
    bitmask = fill_bitmasks(cs, constrained, len(rows), logits.shape[1])  # type: ignore[arg-type]
    bitmask = bitmask.to(device, non_blocking=True)
    both = [i for i in constrained if i in banned_rows]
    plain = None
    if both:  # the min_tokens ban may leave a grammar nothing (it wants to stop): keep the grammar
        plain = logits.float().clone()
        apply_bitmask(plain, bitmask, both)
    apply_bitmask(scores, bitmask, constrained)
    if plain is not None:
        idx = torch.tensor(both, dtype=torch.long, device=device)
        kept = scores.index_select(0, idx)
        dead = torch.isinf(kept).all(dim=1, keepdim=True)
        scores.index_copy_(0, idx, torch.where(dead, plain.index_select(0, idx), kept))


def _index(pairs: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(row, token) pairs -> two long index tensors on `device`."""
    flat = torch.tensor(pairs, dtype=torch.long, device=device).view(-1, 2)
    return flat[:, 0], flat[:, 1]


def _draw(scores: torch.Tensor, row: SampleInput) -> int:
    """One sampled token from fp32 scores `[V]` (temperature > 0)."""
    p = row.params
    scores = scores / p.temperature
    if p.top_k and p.top_k < scores.shape[0]:
        kth = scores.topk(p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = scores.softmax(dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    # No mass left anywhere (every token banned, or scores that overflowed): the row takes its
    # argmax instead of failing the whole step's batch in multinomial.
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
        return int(scores.argmax())
    return int(torch.multinomial(probs, 1, generator=row.generator))


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A request's own generator: seeded requests are reproducible whatever else runs."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
