"""Video bytes -> `pixel_values [T*h*w, C*T_p*P*P]` of a run of temporal patches, like
transformers' Qwen3-VL video processor.

Steps (`Qwen3VLVideoProcessor`, torchvision backend, written with plain torch ops): plan the
video from its header (`common.contract.videos.plan_video`: sampled frames, one size for all
frames within the pixel budget across frames, grid, timestamps); decode only the frames of the
requested temporal patches (`common.video_io.decode_frames`, rgb24); resize every frame with
antialiased bicubic interpolation on uint8 (what torchvision's `resize` runs on CPU); rescale and
normalise in one step as `(x - mean / rescale) / (std / rescale)` in float32 (transformers' fused
form); pad to whole temporal patches with copies of the last frame; patchify with rows in
(patch, block row, block col, in-row, in-col) order, each row flattened as (C, T_p, P, P).

Each temporal patch is independent in the tower (attention within a frame), so a video can be
encoded in chunks of temporal patches, each alone (`first`, `count`), on different encoders.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.contract.videos import (
    VideoLimits,
    VideoPlan,
    VideoPreprocessConfig,
    VideoSampling,
    plan_video,
)
from common.video_io import decode_frames, probe

# PIL resample codes of the config -> torch interpolation modes that run natively on uint8
# frames on the CPU (as torchvision's resize does for them).
_MODES = {2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True, slots=True)
class VideoChunk:
    """What a video's encoded chunk says besides its tensor."""

    first_patch: int  # its first temporal patch in the whole video
    total_patches: int  # temporal patches of the whole video
    timestamps: tuple[float, ...]  # seconds, one per temporal patch of the chunk
    frames_decoded: int = 0  # frames the decoder produced for it (seeking skips the rest)
    decode_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ProcessedVideo:
    pixel_values: torch.Tensor  # [count*h*w, C*T_p*P*P] float32
    grid_thw: tuple[int, int, int]  # (count, h, w) in patches
    chunk: VideoChunk


def plan(
    data: bytes,
    sampling: VideoSampling,
    cfg: VideoPreprocessConfig,
    limits: VideoLimits | None = None,
) -> VideoPlan:
    """The video's plan from its header, after the limits; ValueError naming what is wrong."""
    info = probe(data)
    if limits is not None:
        limits.check(info)
    return plan_video(info, sampling, cfg)


def preprocess_video(
    data: bytes,
    sampling: VideoSampling,
    cfg: VideoPreprocessConfig,
    first: int = 0,
    count: int = 0,
    limits: VideoLimits | None = None,
) -> ProcessedVideo:
    """Temporal patches first..first+count-1 (count 0 = to the end) of a video file."""
    p = plan(data, sampling, cfg, limits)
    total = p.grid[0]
    count = count or total - first
    if first < 0 or count <= 0 or first + count > total:
        raise ValueError(
            f"temporal patches {first}..{first + count - 1} asked for; the video has {total}"
        )
    started = time.perf_counter()
    decoded = decode_frames(data, p.frames_of(first, count, cfg.temporal_patch_size))
    decode_s = time.perf_counter() - started
    pixels = frames_to_patches(decoded.frames, p.height, p.width, cfg)
    chunk = VideoChunk(first, total, p.timestamps[first : first + count], decoded.decoded, decode_s)
    return ProcessedVideo(pixels, (count, p.grid[1], p.grid[2]), chunk)


def frames_to_patches(
    frames: np.ndarray, height: int, width: int, cfg: VideoPreprocessConfig
) -> torch.Tensor:
    """`[n, H, W, 3]` uint8 frames (n a multiple of the temporal patch) ->
    `[n/T_p*h*w, C*T_p*P*P]` float32."""
    mode = _MODES.get(cfg.resample)
    if mode is None:
        raise ValueError(f"video resample mode {cfg.resample} is not supported (2 or 3)")
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()
    if tuple(x.shape[-2:]) != (height, width):  # [n, C, H, W] uint8
        x = F.interpolate(x, size=(height, width), mode=mode, align_corners=False, antialias=True)
    mean = torch.tensor(cfg.image_mean) * (1.0 / cfg.rescale_factor)
    std = torch.tensor(cfg.image_std) * (1.0 / cfg.rescale_factor)
    x = (x.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    n, c = x.shape[:2]
    tp, ps, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    if n % tp:
        raise ValueError(f"{n} frames do not fill whole temporal patches of {tp}")
    gh, gw = height // ps, width // ps
    patches = x.view(n // tp, tp, c, gh // m, m, ps, gw // m, m, ps)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [t, bh, bw, m, m, C, T_p, P, P]
    return patches.reshape(n // tp * gh * gw, c * tp * ps * ps).contiguous()
