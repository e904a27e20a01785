"""Image bytes -> `pixel_values [N_patches, C*T*P*P]` and `grid_thw`, like transformers' PIL
image processor.

Steps (Qwen2-VL/Qwen3-VL image processor, PIL backend): decode (first frame), convert to RGB
compositing transparency onto white, smart-resize to multiples of patch*merge within
[min_pixels, max_pixels] with bicubic resampling, rescale by 1/255 in float64 then float32,
normalise, then patchify: rows in 2x2 merge-block order, each row flattened as (C, T, P, P) with
the still image repeated over T.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# Decoding refuses images above this many pixels before allocating them (decompression bombs).
DEFAULT_MAX_INPUT_PIXELS = 64 * 1024 * 1024
MAX_ASPECT_RATIO = 200


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


@dataclass(frozen=True, slots=True)
class ProcessedImage:
    pixel_values: torch.Tensor  # [t*h*w, C*T*P*P] float32, merge-block row order
    grid_thw: tuple[int, int, int]  # in patches

    def num_tokens(self, merge: int) -> int:
        t, h, w = self.grid_thw
        return t * h * w // (merge * merge)


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


def decode_image(data: bytes, cfg: PreprocessConfig) -> Image.Image:
    """Encoded bytes (PNG/JPEG/WebP/GIF/...) -> RGB image; first frame of animations."""
    if not data:
        raise ValueError("image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > cfg.max_input_pixels:
                raise ValueError(
                    f"image has {w}x{h} = {w * h} pixels, over the limit {cfg.max_input_pixels}"
                )
            img.seek(0)
            img.load()
    except ValueError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ValueError(f"image too large to decode safely: {e}") from e
    except Exception as e:  # PIL raises many types for corrupt data
        raise ValueError(f"cannot decode image: {type(e).__name__}: {e}") from e
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.width <= 0 or img.height <= 0:
        raise ValueError(f"image has zero size ({img.width}x{img.height})")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def preprocess(image: bytes | Image.Image, cfg: PreprocessConfig) -> ProcessedImage:
    img = decode_image(image, cfg) if isinstance(image, bytes) else to_rgb(image)
    if img.width * img.height > cfg.max_input_pixels:
        raise ValueError(
            f"image has {img.width}x{img.height} pixels, more than the limit {cfg.max_input_pixels}"
        )
    height, width = smart_resize(img.height, img.width, cfg)
    resized = np.array(img.resize((width, height), resample=cfg.resample))  # [H, W, C] uint8
    x = (resized.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.array(cfg.image_mean, dtype=np.float32)
    std = np.array(cfg.image_std, dtype=np.float32)
    x = ((x - mean) / std).transpose(2, 0, 1)  # [C, H, W]
    return ProcessedImage(
        torch.from_numpy(patchify(x, cfg)), (1, height // cfg.patch_size, width // cfg.patch_size)
    )


def patchify(x: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """[C, H, W] -> [gh*gw, C*T*P*P] with rows in (block_row, block_col, in_row, in_col) order."""
    c, height, width = x.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = height // p, width // p
    patches = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
    return np.ascontiguousarray(patches.reshape(gh * gw, c * t * p * p), dtype=np.float32)
