"""Prompt logprobs: each prompt token's log-probability given the tokens before it.

For a request that asks (`SamplingParams.prompt_logprobs`, e.g. `/v1/completions` with `echo`
and `logprobs`, what evaluation harnesses score with), every prompt chunk's rows also go through
the LM head: row j of the prompt gives the distribution of token j + 1. Entries are appended to
`req.prompt_logprobs` in prompt order; a chunk recomputed after preemption finds its entries
there already and adds none. Such a request takes no prefix-cache hits (`scheduler.py`), so every
prompt row is computed once by this request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from services.language.engine.scheduler import ScheduledChunk


def collect_prompt_logprobs(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    chunks: Sequence[ScheduledChunk],
) -> None:
    """`hidden [T, H]`: the step's rows, chunk after chunk in order."""
    q_start = 0
    for c in chunks:
        req = c.req
        k = req.params.prompt_logprobs
        hi = min(c.start + c.length, req.num_prompt - 1)
        lo = max(c.start, len(req.prompt_logprobs))  # entries a previous computation made
        if k is not None and lo < hi and c.start <= len(req.prompt_logprobs):
            rows = torch.arange(
                q_start + lo - c.start, q_start + hi - c.start, device=hidden.device
            )
            logprobs = torch.log_softmax(compute_logits(hidden[rows]).float(), dim=-1)  # [R, V]
            nxt = torch.tensor(req.prompt_ids[lo + 1 : hi + 1], device=hidden.device)
            chosen = logprobs.gather(1, nxt[:, None])[:, 0].tolist()
            if k:
                values, ids = logprobs.topk(k, dim=-1)
                tops = [
                    tuple(zip(i, v, strict=True))
                    for i, v in zip(ids.tolist(), values.tolist(), strict=True)
                ]
            else:
                tops = [()] * len(chosen)
            req.prompt_logprobs.extend(zip(chosen, tops, strict=True))
        q_start += c.length
