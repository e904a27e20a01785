"""Videos in the request contract: which frames are sampled, the size they are resized to, the
patch grid, the timestamps and placeholders in the prompt, references and limits (pure Python).

This is transformers 5.24's Qwen3-VL video processor (`video_processing_qwen3_vl.py`) and
processor (`processing_qwen3_vl.py`), written once for every role:
- sampling: `num_frames = int(total / video_fps * fps)`, clamped to [min_frames, max_frames] and
  to the frames there are; indices `linspace(0, total - 1, num_frames)` rounded half to even
  (numpy's rounding, as transformers uses);
- resize: one size for all frames, with the pixel budget counted across frames
  (`round(frames / 2) * 2 * h * w` within the config's `size` bounds);
- grid: frames padded with copies of the last one to a multiple of `temporal_patch_size`, so
  `(ceil(frames / 2), h / 16, w / 16)`;
- prompt: the i-th `<|video_pad|>` of the rendered chat template becomes, per temporal patch,
  `<{t:.1f} seconds>` (the mean time of its frames), `<|vision_start|>`, `h * w / 4` video-pad
  tokens, `<|vision_end|>`. Only the pad token is replaced: the template's own
  `<|vision_start|>` / `<|vision_end|>` around it stay (transformers 5.24 does exactly this).

The gateway plans a video from its container header (`VideoInfo`: frames, fps, size), predicting
its tokens before anything is decoded; the encoder plans it again from the same header and
decodes exactly the planned frames, so both agree without asking each other.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.contract.images import MAX_ASPECT_RATIO, MIB, Grid
from common.contract.sampling import ContractError
from common.rpc import tensor_pb2

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VIDEO_PAD = "<|video_pad|>"
MAX_REQUEST_FPS = 60.0  # mm_processor_kwargs.fps above this is refused


@dataclass(frozen=True, slots=True)
class VideoPreprocessConfig:
    """The checkpoint's video-processor settings (`Qwen3VLVideoProcessor` defaults)."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 128 * 32 * 32  # size.shortest_edge: pixels across all sampled frames
    max_pixels: int = 32 * 32 * 768  # size.longest_edge
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = 3  # bicubic
    fps: float = 2.0  # frames sampled per second of video, by default
    min_frames: int = 4
    max_frames: int = 768
    # qwen-vl-utils' per-frame cap (transformers' `cap_pixels_per_frame`; off unless configured).
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 768

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def cache_key(self) -> str:
        """Everything that changes the encoder's output for given bytes and sampling."""
        return json.dumps(
            [
                self.patch_size,
                self.temporal_patch_size,
                self.merge_size,
                self.min_pixels,
                self.max_pixels,
                self.image_mean,
                self.image_std,
                self.rescale_factor,
                self.resample,
                self.min_frames,
                self.cap_pixels_per_frame,
                self.max_video_tokens,
            ]
        )

    def sampling(self, fps: float | None = None, max_frames: int | None = None) -> VideoSampling:
        """The sampling of one request: the checkpoint's defaults unless the request narrows
        them (`mm_processor_kwargs`). Raises ContractError for values outside the server's."""
        if fps is None:
            fps = self.fps
        elif not 0 < fps <= MAX_REQUEST_FPS:
            raise ContractError(
                f"mm_processor_kwargs.fps must be in (0, {MAX_REQUEST_FPS:g}], got {fps}",
                "mm_processor_kwargs",
            )
        if max_frames is None:
            max_frames = self.max_frames
        elif not 2 <= max_frames <= self.max_frames:
            raise ContractError(
                f"mm_processor_kwargs.max_frames must be in [2, {self.max_frames}] (this server's "
                f"limit), got {max_frames}",
                "mm_processor_kwargs",
            )
        return VideoSampling(float(fps), int(max_frames))

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> VideoPreprocessConfig:
        size = d.get("size") or {}
        base = cls()
        return cls(
            patch_size=int(d.get("patch_size", base.patch_size)),
            temporal_patch_size=int(d.get("temporal_patch_size", base.temporal_patch_size)),
            merge_size=int(d.get("merge_size", base.merge_size)),
            min_pixels=int(size.get("shortest_edge") or base.min_pixels),
            max_pixels=int(size.get("longest_edge") or base.max_pixels),
            image_mean=tuple(float(x) for x in d.get("image_mean", base.image_mean)),
            image_std=tuple(float(x) for x in d.get("image_std", base.image_std)),
            rescale_factor=float(d.get("rescale_factor", base.rescale_factor)),
            resample=int(d.get("resample", base.resample)),
            fps=float(d.get("fps") or base.fps),
            min_frames=int(d.get("min_frames", base.min_frames)),
            max_frames=int(d.get("max_frames", base.max_frames)),
            cap_pixels_per_frame=bool(d.get("cap_pixels_per_frame") or False),
            max_video_tokens=int(d.get("max_video_tokens", base.max_video_tokens)),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> VideoPreprocessConfig:
        """The settings transformers loads, in its order: `processor_config.json`'s
        `video_processor`, `video_preprocessor_config.json`, `preprocessor_config.json`."""
        d = Path(model_dir)
        if (d / "processor_config.json").is_file():
            data = json.loads((d / "processor_config.json").read_text())
            if "video_processor" in data:
                return cls.from_hf(data["video_processor"])
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            if (d / name).is_file():
                return cls.from_hf(json.loads((d / name).read_text()))
        raise ValueError(f"{model_dir}: no video processor settings")


@dataclass(frozen=True, slots=True)
class VideoSampling:
    """How one request samples its videos."""

    fps: float  # frames per second of video
    max_frames: int  # frames sampled at most

    @property
    def cache_key(self) -> str:
        return f"{self.fps!r}/{self.max_frames}"


@dataclass(frozen=True, slots=True)
class VideoInfo:
    """A video as its container header describes it (PyAV: the first video stream)."""

    total_frames: int
    fps: float  # the stream's average frame rate
    width: int
    height: int

    @property
    def seconds(self) -> float:
        return self.total_frames / self.fps if self.fps > 0 else 0.0


@dataclass(frozen=True, slots=True)
class VideoPlan:
    """What the processor makes of one video: the frames it decodes, their size and grid, and
    the timestamp of every temporal patch."""

    indices: tuple[int, ...]  # sampled frame indices (before padding to the temporal patch)
    height: int  # resized frame size in pixels
    width: int
    grid: Grid  # (temporal patches, h, w) in patches, before the merge
    timestamps: tuple[float, ...]  # seconds, one per temporal patch

    def tokens_per_patch(self, merge: int) -> int:
        return self.grid[1] * self.grid[2] // (merge * merge)

    def frames_of(self, first: int, count: int, temporal: int) -> tuple[int, ...]:
        """The sampled frame indices of temporal patches first..first+count-1, padded with the
        last frame as the processor pads (a patch past the sampled frames repeats the last)."""
        padded = list(self.indices)
        padded += [padded[-1]] * (-len(padded) % temporal)
        return tuple(padded[first * temporal : (first + count) * temporal])


def sample_indices(info: VideoInfo, sampling: VideoSampling, min_frames: int) -> list[int]:
    """`Qwen3VLVideoProcessor.sample_frames` with fps sampling."""
    total = info.total_frames
    fps = info.fps if info.fps > 0 else 24.0  # transformers' default when the rate is unknown
    n = int(total / fps * sampling.fps)
    n = min(max(n, min_frames), sampling.max_frames, total)
    if n <= 0:
        return []
    # numpy's linspace(0, total - 1, n).round(): step = (total - 1) / (n - 1), half to even.
    if n == 1:
        return [0]
    step = (total - 1) / (n - 1)
    return [round(i * step) if i < n - 1 else total - 1 for i in range(n)]


def video_smart_resize(
    num_frames: int, height: int, width: int, cfg: VideoPreprocessConfig
) -> tuple[int, int]:
    """The video processor's `smart_resize` (with its per-frame cap when configured)."""
    temporal, f = cfg.temporal_patch_size, cfg.factor
    if num_frames < temporal:
        raise ValueError(f"the video gives {num_frames} frame(s); at least {temporal} are needed")
    max_pixels = cfg.max_pixels
    if cfg.cap_pixels_per_frame:
        frame_cap = cfg.max_video_tokens * f * f
        per_frame = max(min(frame_cap, cfg.max_pixels // num_frames), int(cfg.min_pixels * 1.05))
        max_pixels = per_frame * num_frames
    if min(height, width) <= 0:
        raise ValueError(f"video has zero size ({width}x{height})")
    if height < f or width < f:
        scale = max(f / height, f / width)
        height, width = int(height * scale), int(width * scale)
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"video aspect ratio {ratio:.1f} exceeds {MAX_ASPECT_RATIO}")
    h_bar, w_bar = round(height / f) * f, round(width / f) * f
    t_bar = round(num_frames / temporal) * temporal
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(f, math.floor(height / beta / f) * f)
        w_bar = max(f, math.floor(width / beta / f) * f)
    elif t_bar * h_bar * w_bar < cfg.min_pixels:
        beta = math.sqrt(cfg.min_pixels / (num_frames * height * width))
        h_bar, w_bar = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
    return h_bar, w_bar


def patch_timestamps(indices: Sequence[int], fps: float, temporal: int) -> list[float]:
    """The processor's `_calculate_timestamps`: per temporal patch, the mean time of its first
    and last frame (the last index repeated to fill the final patch)."""
    idx = list(indices)
    idx += [idx[-1]] * (-len(idx) % temporal)
    times = [i / fps for i in idx]
    return [(times[i] + times[i + temporal - 1]) / 2 for i in range(0, len(times), temporal)]


def plan_video(info: VideoInfo, sampling: VideoSampling, cfg: VideoPreprocessConfig) -> VideoPlan:
    """The frames, size, grid and timestamps of a video; ValueError if it cannot be processed."""
    if info.total_frames <= 0:
        raise ValueError("the video has no frames")
    indices = sample_indices(info, sampling, cfg.min_frames)
    height, width = video_smart_resize(len(indices), info.height, info.width, cfg)
    temporal = cfg.temporal_patch_size
    grid = (-(-len(indices) // temporal), height // cfg.patch_size, width // cfg.patch_size)
    fps = info.fps if info.fps > 0 else 24.0
    stamps = patch_timestamps(indices, fps, temporal)
    return VideoPlan(tuple(indices), height, width, grid, tuple(stamps))


def video_prompt_text(timestamps: Sequence[float]) -> str:
    """One video's text in the prompt, one video-pad token per temporal patch (the gateway
    expands each to the patch's token count after tokenizing)."""
    return "".join(f"<{t:.1f} seconds>{VISION_START}{VIDEO_PAD}{VISION_END}" for t in timestamps)


def expand_video_placeholders(text: str, timestamps: Sequence[Sequence[float]]) -> str:
    """Replace the i-th `<|video_pad|>` of a rendered prompt by the i-th video's timestamped
    runs, as `Qwen3VLProcessor` does before tokenizing."""
    pieces = text.split(VIDEO_PAD)
    if len(pieces) - 1 != len(timestamps):
        raise ContractError(
            f"prompt has {len(pieces) - 1} video placeholder(s) but {len(timestamps)} video(s)",
            "messages",
        )
    out = [pieces[0]]
    for stamps, rest in zip(timestamps, pieces[1:], strict=True):
        out += [video_prompt_text(stamps), rest]
    return "".join(out)


def chunk_patches(grid: Grid, max_patches: int) -> list[tuple[int, int]]:
    """Split a video's temporal patches into (first, count) chunks of at most `max_patches`
    patches each (at least one temporal patch per chunk): one Encode call per chunk."""
    t, h, w = grid
    per_chunk = max(1, max_patches // (h * w))
    return [(first, min(per_chunk, t - first)) for first in range(0, t, per_chunk)]


@dataclass(frozen=True, slots=True)
class VideoRef:
    """One encoded chunk of a video (whole or a run of its temporal patches) on its way to the
    language service: `grid[0]` temporal patches, each its own run of video-pad tokens."""

    handle: tensor_pb2.TensorHandle  # its wire tensor `[n_tokens, (1 + D) * H]`, at the encoder
    grid: Grid  # (temporal patches in this chunk, h, w)
    n_tokens: int  # = t * h * w / merge^2
    content_hash: str = ""  # SHA-256 of the video file: routing and logs only
    first_patch: int = 0  # index of its first temporal patch in the whole video
    timestamps: tuple[float, ...] = ()  # seconds, one per temporal patch of this chunk

    def patch_counts(self, merge: int) -> list[int]:
        t, h, w = self.grid
        return [h * w // (merge * merge)] * t


@dataclass(frozen=True)
class VideoLimits:
    """What one request's videos may be; the gateway checks them from the container header
    before anything is decoded, and the encoder checks them again."""

    max_videos_per_request: int = 4
    max_video_bytes: int = 64 * MIB  # encoded bytes of one video file
    max_video_seconds: float = 600.0  # duration from the header (frames / fps)
    max_video_frames: int = 36000  # frames in the container (what decoding may have to walk)

    def __post_init__(self) -> None:
        for name in (
            "max_videos_per_request",
            "max_video_bytes",
            "max_video_seconds",
            "max_video_frames",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def check(self, info: VideoInfo) -> None:
        """ValueError naming the limit a video's header exceeds."""
        if info.total_frames > self.max_video_frames:
            raise ValueError(
                f"video has {info.total_frames} frames, over the limit of {self.max_video_frames} "
                "(--max-video-frames)"
            )
        if info.seconds > self.max_video_seconds:
            raise ValueError(
                f"video lasts {info.seconds:.1f} s, over the limit of {self.max_video_seconds:g} s "
                "(--max-video-seconds)"
            )


def add_video_limit_arguments(parser: argparse.ArgumentParser) -> None:
    d = VideoLimits()
    g = parser.add_argument_group("video limits")
    g.add_argument(
        "--max-videos-per-request",
        type=int,
        default=d.max_videos_per_request,
        help="videos one request may carry",
    )
    g.add_argument(
        "--max-video-bytes",
        type=int,
        default=d.max_video_bytes,
        help="encoded bytes per video file",
    )
    g.add_argument(
        "--max-video-seconds",
        type=float,
        default=d.max_video_seconds,
        help="duration per video, from its container header (frames / fps)",
    )
    g.add_argument(
        "--max-video-frames",
        type=int,
        default=d.max_video_frames,
        help="frames per video in its container (what decoding may walk through)",
    )


def video_limits_from_args(args: argparse.Namespace) -> VideoLimits:
    return VideoLimits(
        args.max_videos_per_request,
        args.max_video_bytes,
        args.max_video_seconds,
        args.max_video_frames,
    )
