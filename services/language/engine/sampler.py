"""Next-token sampling, one row per request with that request's parameters.

Order (as vLLM applies them): penalties on the raw logits (repetition over prompt + output;
presence/frequency over the output), the min_tokens ban on stop ids, then greedy argmax at
temperature 0, else temperature, top-k, top-p, min-p and a draw from the request's own seeded
generator. Logprobs are reported from the raw logits (log-softmax before any processing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.language.engine.request import SamplingParams


@dataclass(frozen=True, slots=True)
class SampleInput:
    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: list[int]
    output_ids: list[int]
    stop_ids: frozenset[int]  # eos + stop ids, banned while fewer than min_tokens were produced


@dataclass(frozen=True, slots=True)
class Sample:
    token: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


def sample_rows(logits: torch.Tensor, rows: list[SampleInput]) -> list[Sample]:
    """logits `[N, V]` (one row per entry of `rows`) -> one Sample per row."""
    out = []
    raw_logprobs = None
    if any(r.params.logprobs is not None for r in rows):
        raw_logprobs = torch.log_softmax(logits.float(), dim=-1)
    # Plain greedy rows (the common case) take one batched argmax instead of a per-row loop.
    plain = [i for i, r in enumerate(rows) if _plain_greedy(r)]
    greedy = dict(zip(plain, logits[plain].argmax(dim=-1).tolist(), strict=True)) if plain else {}
    for i, row in enumerate(rows):
        token = greedy[i] if i in greedy else _choose(_process(logits[i].float(), row), row)
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


def _plain_greedy(row: SampleInput) -> bool:
    p = row.params
    return (
        p.greedy
        and p.logprobs is None
        and p.repetition_penalty == 1.0
        and not p.presence_penalty
        and not p.frequency_penalty
        and not (len(row.output_ids) < p.min_tokens and row.stop_ids)
    )


def _process(scores: torch.Tensor, row: SampleInput) -> torch.Tensor:
    p = row.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.prompt_ids) | set(row.output_ids)), dtype=torch.long)
        picked = scores[seen]
        scores[seen] = torch.where(
            picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty
        )
    if (p.presence_penalty or p.frequency_penalty) and row.output_ids:
        counts = torch.bincount(torch.tensor(row.output_ids), minlength=scores.shape[0])
        counts = counts[: scores.shape[0]].to(scores.dtype)
        scores -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(scores.dtype)
    if len(row.output_ids) < p.min_tokens and row.stop_ids:
        banned = torch.tensor(sorted(t for t in row.stop_ids if t < scores.shape[0]))
        scores[banned] = float("-inf")
    return scores


def _choose(scores: torch.Tensor, row: SampleInput) -> int:
    p = row.params
    if p.greedy:
        return int(scores.argmax())
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
    return int(torch.multinomial(probs, 1, generator=row.generator))


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A request's own generator: seeded requests are reproducible whatever else runs."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
