"""Images in the request contract: geometry, token counts, placeholders and references.

Pure Python, shared by every role so that they agree without asking each other:
- `PreprocessConfig` and `smart_resize`: the checkpoint's image-processor settings and the size an
  image is resized to. The encoder resizes with them; the gateway, which knows an image's width
  and height from its header, predicts the image's token count before anything is encoded, so a
  prompt that does not fit is refused before any encoder works on it.
- `image_token_count`, `expand_image_pads`, `image_pad_runs`: how many image-pad tokens an image
  takes in the prompt and where they sit.
- `ImageRef`: one encoded image as the language service receives it.
- `ImageLimits`: what one request may carry (one set of flags for the gateway and the encoder).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.contract.sampling import ContractError
from common.rpc import tensor_pb2

MIB = 1 << 20
# Decoding refuses images above this many pixels before allocating them (decompression bombs).
DEFAULT_MAX_INPUT_PIXELS = 64 * 1024 * 1024
MAX_ASPECT_RATIO = 200

Grid = tuple[int, int, int]  # (t, h, w) in patches, before the merge


@dataclass(frozen=True, slots=True)
class PreprocessConfig:
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL bicubic
    max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def cache_key(self) -> str:
        """Everything that changes the output for given bytes (for encoder-cache keys)."""
        return json.dumps(
            [self.patch_size, self.temporal_patch_size, self.merge_size, self.min_pixels,
             self.max_pixels, self.image_mean, self.image_std, self.rescale_factor, self.resample]
        )  # fmt: skip

    @classmethod
    def from_hf(cls, d: dict[str, Any], **overrides: Any) -> PreprocessConfig:
        size = d.get("size") or {}
        values = dict(
            patch_size=int(d.get("patch_size", 16)),
            temporal_patch_size=int(d.get("temporal_patch_size", 2)),
            merge_size=int(d.get("merge_size", 2)),
            min_pixels=int(d.get("min_pixels") or size.get("shortest_edge") or 65536),
            max_pixels=int(d.get("max_pixels") or size.get("longest_edge") or 16777216),
            image_mean=tuple(float(x) for x in d.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(float(x) for x in d.get("image_std", (0.5, 0.5, 0.5))),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            resample=int(d.get("resample", 3)),
        )
        values.update(overrides)
        cfg = cls(**values)  # type: ignore[arg-type]
        if cfg.min_pixels > cfg.max_pixels:
            raise ValueError(f"min_pixels {cfg.min_pixels} > max_pixels {cfg.max_pixels}")
        return cfg

    @classmethod
    def from_dir(cls, model_dir: str | Path, **overrides: Any) -> PreprocessConfig:
        """`preprocessor_config.json`, or the `image_processor` part of `processor_config.json`."""
        d = Path(model_dir)
        if (d / "preprocessor_config.json").is_file():
            return cls.from_hf(
                json.loads((d / "preprocessor_config.json").read_text()), **overrides
            )
        if (d / "processor_config.json").is_file():
            data = json.loads((d / "processor_config.json").read_text())
            return cls.from_hf(data.get("image_processor", data), **overrides)
        raise ValueError(f"{model_dir}: no preprocessor_config.json or processor_config.json")


def smart_resize(height: int, width: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """Target (height, width): multiples of patch*merge, pixel count within the bounds."""
    if min(height, width) <= 0:
        raise ValueError(f"image has zero size ({width}x{height})")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"image aspect ratio {ratio:.1f} exceeds {MAX_ASPECT_RATIO}")
    f = cfg.factor
    h_bar, w_bar = round(height / f) * f, round(width / f) * f
    if h_bar * w_bar > cfg.max_pixels:
        beta = math.sqrt(height * width / cfg.max_pixels)
        h_bar = max(f, math.floor(height / beta / f) * f)
        w_bar = max(f, math.floor(width / beta / f) * f)
    elif h_bar * w_bar < cfg.min_pixels:
        beta = math.sqrt(cfg.min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
    return h_bar, w_bar


def image_grid(width: int, height: int, cfg: PreprocessConfig) -> Grid:
    """Patch grid of a still image of `width` x `height` pixels after its resize."""
    h, w = smart_resize(height, width, cfg)
    return (1, h // cfg.patch_size, w // cfg.patch_size)


def image_token_count(grid: Sequence[int], merge_size: int) -> int:
    """Image-pad tokens an image takes in the prompt: t*h*w / merge^2."""
    t, h, w = grid
    return t * h * w // (merge_size * merge_size)


def expand_image_pads(
    ids: Sequence[int],
    image_token_id: int,
    counts: Sequence[int],
    video_token_id: int | None = None,
    video_counts: Sequence[int] = (),
) -> list[int]:
    """Replace the i-th single image-pad token of a rendered prompt by `counts[i]` copies, and
    the j-th single video-pad token (one per temporal patch of every video, in order: see
    `common.contract.videos`) by `video_counts[j]` copies."""
    out: list[int] = []
    image = video = 0
    for tok in ids:
        if tok == image_token_id:
            if image >= len(counts):
                raise ContractError(
                    f"prompt has more image placeholders than the {len(counts)} image(s)",
                    "messages",
                )
            out.extend([image_token_id] * counts[image])
            image += 1
        elif tok == video_token_id and video_token_id is not None:
            if video >= len(video_counts):
                raise ContractError("prompt has more video placeholders than the videos fill",
                                    "messages")  # fmt: skip
            out.extend([video_token_id] * video_counts[video])
            video += 1
        else:
            out.append(tok)
    if image != len(counts):
        raise ContractError(
            f"prompt has {image} image placeholder(s) but {len(counts)} image(s)", "messages"
        )
    if video != len(video_counts):
        raise ContractError(
            f"prompt has {video} video-patch placeholder(s) but the videos have "
            f"{len(video_counts)} temporal patches",
            "messages",
        )
    return out


def image_pad_runs(
    ids: Sequence[int], image_token_id: int | None, counts: Sequence[int], what: str = "image"
) -> list[tuple[int, int]]:
    """(start, length) of each image's run of image-pad tokens in an expanded prompt, in image
    order; raises ContractError unless the runs are exactly `counts` (adjacent images' runs may
    touch: they are split by count, in order). `what="video patch"`: the same for the runs of
    video-pad tokens, one per temporal patch."""
    field_ = "videos" if what != "image" else "images"
    if image_token_id is None:
        if counts:
            raise ContractError(f"{field_}: this model takes no {field_}", field_)
        return []
    runs: list[tuple[int, int]] = []
    pos = 0
    for i, n in enumerate(counts):
        while pos < len(ids) and ids[pos] != image_token_id:
            pos += 1
        if n <= 0 or pos + n > len(ids) or any(t != image_token_id for t in ids[pos : pos + n]):
            raise ContractError(
                f"{field_}: {what} {i} takes {n} tokens but the prompt has no run of {n} "
                f"{what.split()[0]}-pad tokens for it",
                field_,
            )
        runs.append((pos, n))
        pos += n
    if image_token_id in ids[pos:]:
        raise ContractError(
            f"{field_}: the prompt has more {what.split()[0]}-pad tokens than the {field_} fill"
        )
    return runs


@dataclass(frozen=True, slots=True)
class ImageRef:
    """One encoded image on its way to the language service."""

    handle: tensor_pb2.TensorHandle  # its wire tensor `[n_tokens, (1 + D) * H]`, at the encoder
    grid: Grid
    n_tokens: int  # = image_token_count(grid, merge)
    # SHA-256 of the image file as the encoder computed it: routing and logs only. The language
    # service identifies an image by a digest of the tensor bytes it received, never by this.
    content_hash: str = ""


@dataclass(frozen=True)
class ImageLimits:
    """What one request may carry; the gateway checks them before any image is encoded and the
    encoder checks them again on its own API."""

    max_images_per_request: int = 16
    max_image_bytes: int = 20 * MIB  # encoded bytes of one image
    max_image_pixels: int = DEFAULT_MAX_INPUT_PIXELS  # width * height of one image, before resize

    def __post_init__(self) -> None:
        for name in ("max_images_per_request", "max_image_bytes", "max_image_pixels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def add_image_limit_arguments(parser: argparse.ArgumentParser) -> None:
    d = ImageLimits()
    g = parser.add_argument_group("image limits")
    g.add_argument(
        "--max-images-per-request",
        type=int,
        default=d.max_images_per_request,
        help="images one request may carry",
    )
    g.add_argument(
        "--max-image-bytes", type=int, default=d.max_image_bytes, help="encoded bytes per image"
    )
    g.add_argument(
        "--max-image-pixels",
        type=int,
        default=d.max_image_pixels,
        help="pixels (width x height) per image, checked from its header before decoding",
    )


def image_limits_from_args(args: argparse.Namespace) -> ImageLimits:
    return ImageLimits(args.max_images_per_request, args.max_image_bytes, args.max_image_pixels)
