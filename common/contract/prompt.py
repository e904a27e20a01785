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
    video_token_id: int | None = None  # None: the model takes no videos


@dataclass(frozen=True, slots=True)
class PromptSpans:
    """Where the visual tokens of a checked prompt sit: (start, length) of each image's run, and
    per video chunk the runs of its temporal patches."""

    images: list[tuple[int, int]]
    videos: list[list[tuple[int, int]]]


def check_prompt(
    prompt_ids: Sequence[int],
    image_counts: Sequence[int],
    params: SamplingParams,
    limits: PromptLimits,
    video_patch_counts: Sequence[Sequence[int]] = (),
) -> PromptSpans:
    """Raises ContractError unless the prompt is non-empty, its ids and the stop ids are in the
    vocabulary, the i-th image's pad run has `image_counts[i]` tokens, the runs of video-pad
    tokens are the videos' temporal patches (`video_patch_counts[j]`: the token count of each
    patch of video chunk j), and prompt + max_tokens fits max_model_len."""
    if not prompt_ids:
        raise ContractError("prompt_token_ids: the prompt is empty", "messages")
    if min(prompt_ids) < 0 or max(prompt_ids) >= limits.vocab_size:
        check_token_ids(prompt_ids, limits.vocab_size, "prompt_token_ids")
    params.check_vocab(limits.vocab_size)
    spans = image_pad_runs(prompt_ids, limits.image_token_id, image_counts)
    flat = [n for video in video_patch_counts for n in video]
    runs = image_pad_runs(prompt_ids, limits.video_token_id, flat, "video patch")
    videos, at = [], 0
    for video in video_patch_counts:
        videos.append(runs[at : at + len(video)])
        at += len(video)
    resolve_max_tokens(len(prompt_ids), params.max_tokens, limits.max_model_len, params.min_tokens)
    return PromptSpans(spans, videos)
