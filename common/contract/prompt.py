"""What a prompt must satisfy on a replica, checked at each boundary by the same function.

The gateway checks the prompt it built (with image token counts predicted from the images'
sizes) before any image is encoded; the language servicer checks what arrives on the wire before
any image is pulled. Both call `check_prompt`, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.contract.images import image_pad_runs
from common.contract.replica import resolve_max_tokens
from common.contract.sampling import ContractError, SamplingParams, check_token_ids


@dataclass(frozen=True, slots=True)
class PromptLimits:
    vocab_size: int
    max_model_len: int
    image_token_id: int | None  # None: the model takes no images
    merge_size: int = 2


def check_prompt(
    prompt_ids: Sequence[int],
    image_counts: Sequence[int],
    params: SamplingParams,
    limits: PromptLimits,
) -> list[tuple[int, int]]:
    """Raises ContractError unless the prompt is non-empty, its ids and the stop ids are in the
    vocabulary, the i-th image's pad run has `image_counts[i]` tokens, and prompt + max_tokens
    fits max_model_len. Returns each image's (start, length) in the prompt."""
    if not prompt_ids:
        raise ContractError("prompt_token_ids: the prompt is empty", "messages")
    if min(prompt_ids) < 0 or max(prompt_ids) >= limits.vocab_size:
        check_token_ids(prompt_ids, limits.vocab_size, "prompt_token_ids")
    params.check_vocab(limits.vocab_size)
    spans = image_pad_runs(prompt_ids, limits.image_token_id, image_counts)
    resolve_max_tokens(len(prompt_ids), params.max_tokens, limits.max_model_len, params.min_tokens)
    return spans
