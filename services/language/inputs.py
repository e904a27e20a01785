"""Prompt inputs of the decoder: image identities and the embedding/deepstack tensors.

An image's wire tensor is `[n_tokens, (1 + D) * H]`: column block 0 goes into `input_embeds` at
the image's pad rows, blocks 1..D into `input_deepstack_embeds [T, D*H]` (zeros on text rows).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

import torch
import xxhash

# Seeds the tensor digests: a client cannot craft an image whose digest collides with another's
# without knowing it (XXH3 is fast, ~0.3 ms per 16 MiB here, but not collision-resistant by itself).
_SEED = int.from_bytes(os.urandom(8), "little")


def image_identity(tensor: torch.Tensor, grid: Sequence[int]) -> bytes:
    """16-byte identity of an image as this process received it: its grid (M-RoPE positions
    depend on it), dtype, shape and tensor bytes. Prefix-cache keys use it."""
    h = xxhash.xxh3_128(seed=_SEED)
    h.update(struct.pack("<3I", *grid))
    h.update(str(tensor.dtype).encode() + struct.pack(f"<{tensor.ndim}q", *tensor.shape))
    data = tensor.detach().contiguous().cpu()
    h.update(data.reshape(-1).view(torch.uint8).numpy().data)
    return h.digest()


def scatter_images(
    text_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    image_token_id: int,
    images: Sequence[torch.Tensor],
    num_deepstack: int,
    video_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`text_embeds [T, H]` with image rows replaced, and `[T, D*H]` deepstack (None if no image).

    `images` are the wire tensors (or a video's temporal patches) in prompt order; their rows
    fill the image-pad and video-pad positions in order. Raises ValueError when widths or row
    counts disagree with the prompt.
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
    if video_token_id is not None:
        mask |= input_ids == video_token_id
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
