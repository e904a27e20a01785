"""Prompt inputs of the decoder: image-pad expansion and the embedding/deepstack tensors.

An image's wire tensor is `[n_tokens, (1 + D) * H]`: column block 0 goes into `input_embeds` at
the image's pad rows, blocks 1..D into `input_deepstack_embeds [T, D*H]` (zeros on text rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def expand_image_pads(ids: Sequence[int], image_token_id: int, counts: Sequence[int]) -> list[int]:
    """Replace the i-th single image-pad token of a rendered prompt by `counts[i]` copies."""
    out: list[int] = []
    image = 0
    for tok in ids:
        if tok != image_token_id:
            out.append(tok)
            continue
        if image >= len(counts):
            raise ValueError(f"prompt has more image placeholders than the {len(counts)} image(s)")
        out.extend([image_token_id] * counts[image])
        image += 1
    if image != len(counts):
        raise ValueError(f"prompt has {image} image placeholder(s) but {len(counts)} image(s)")
    return out


def scatter_images(
    text_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    image_token_id: int,
    images: Sequence[torch.Tensor],
    num_deepstack: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`text_embeds [T, H]` with image rows replaced, and `[T, D*H]` deepstack (None if no image).

    `images` are the wire tensors in prompt order; their rows fill the image-pad positions in
    order. Raises ValueError when widths or row counts disagree with the prompt.
    """
    if not images:
        return text_embeds, None
    t, h = text_embeds.shape
    width = (1 + num_deepstack) * h
    for i, img in enumerate(images):
        if img.ndim != 2 or img.shape[1] != width:
            raise ValueError(f"image {i} has shape {tuple(img.shape)}, expected [n, {width}]")
    rows = torch.cat(list(images)).to(device=text_embeds.device, dtype=text_embeds.dtype)
    mask = input_ids == image_token_id  # [T]
    if int(mask.sum()) != rows.shape[0]:
        raise ValueError(
            f"prompt has {int(mask.sum())} image-pad tokens; the images have {rows.shape[0]} rows"
        )
    embeds = text_embeds.clone()
    embeds[mask] = rows[:, :h]
    deepstack = None
    if num_deepstack:
        deepstack = text_embeds.new_zeros(t, num_deepstack * h)
        deepstack[mask] = rows[:, h:]
    return embeds, deepstack
