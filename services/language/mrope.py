"""M-RoPE positions for Qwen3-VL prompts (pure functions).

A text run of n tokens gets positions cur..cur+n-1 on all three axes. An image of patch grid
(t, h, w) contributes t*h*w/m^2 tokens on the merged grid (m = spatial merge size) with
t-axis = cur, h-axis = cur + row, w-axis = cur + col; then `cur += max(h, w) / m` — not the token
count. A video's temporal patches are each such a run of video-pad tokens with t = 1 (the time is
in the timestamp text between them), as transformers splits `video_grid_thw`.
`rope_delta = max_position + 1 - len(tokens)`; a token generated at cache length c has all
three positions equal to c + rope_delta.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Grid = tuple[int, int, int]


def num_image_tokens(grid: Grid, merge: int) -> int:
    t, h, w = grid
    return t * h * w // (merge * merge)


def mrope_positions(
    input_ids: Sequence[int],
    image_token_id: int,
    grids: Sequence[Grid],
    merge: int,
    video_token_id: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Positions `[3, T]` (int64) and rope_delta for one prompt.

    Visual items are matched to runs of image-pad (or video-pad) tokens in prompt order; each
    consumes exactly its token count (a video's temporal patch is one item of grid (1, h, w)).
    Raises ValueError when the pad tokens and the grids disagree.
    """
    ids = list(input_ids)
    visual = {image_token_id} if video_token_id is None else {image_token_id, video_token_id}
    expected = sum(num_image_tokens(g, merge) for g in grids)
    found = sum(1 for i in ids if i in visual)
    if found != expected:
        raise ValueError(
            f"prompt has {found} image-pad tokens (video-pad included) but its {len(grids)} "
            f"visual item(s) need {expected}"
        )
    rows: list[torch.Tensor] = []
    cur, pos, image = 0, 0, 0
    while pos < len(ids):
        if ids[pos] not in visual:
            end = pos
            while end < len(ids) and ids[end] not in visual:
                end += 1
            rows.append(torch.arange(cur, cur + end - pos).expand(3, -1))
            cur += end - pos
            pos = end
            continue
        t, h, w = grids[image]
        gh, gw = h // merge, w // merge
        tt, hh, ww = torch.meshgrid(
            torch.zeros(t, dtype=torch.long), torch.arange(gh), torch.arange(gw), indexing="ij"
        )
        block = torch.stack([tt, hh, ww]).reshape(3, -1) + cur
        n = block.shape[1]
        if ids[pos : pos + n] != [ids[pos]] * n:
            raise ValueError(f"visual item {image} needs {n} consecutive pad tokens at {pos}")
        rows.append(block)
        cur += max(h, w) // merge
        pos += n
        image += 1
    positions = torch.cat(rows, dim=1) if rows else torch.zeros(3, 0, dtype=torch.long)
    delta = int(positions.max()) + 1 - len(ids) if len(ids) else 0
    return positions.long(), delta


def decode_positions(cache_len: int, rope_delta: int, num_tokens: int = 1) -> torch.Tensor:
    """Positions `[3, num_tokens]` of tokens appended after `cache_len` cached tokens."""
    start = cache_len + rope_delta
    return torch.arange(start, start + num_tokens).expand(3, -1).clone()
