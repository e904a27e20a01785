"""Image bytes -> `pixel_values [N_patches, C*T*P*P]` and `grid_thw`, like transformers' PIL
image processor.

Steps (Qwen2-VL/Qwen3-VL image processor, PIL backend): decode (first frame), convert to RGB
compositing transparency onto white, smart-resize to multiples of patch*merge within
[min_pixels, max_pixels] with bicubic resampling, rescale by 1/255 in float64 then float32,
normalise, then patchify: rows in 2x2 merge-block order, each row flattened as (C, T, P, P) with
the still image repeated over T. The settings and the resize arithmetic are the shared contract's
(`common.contract.images`), so the gateway predicts the same token counts.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from common.contract.images import PreprocessConfig, image_token_count, smart_resize


@dataclass(frozen=True, slots=True)
class ProcessedImage:
    pixel_values: torch.Tensor  # [t*h*w, C*T*P*P] float32, merge-block row order
    grid_thw: tuple[int, int, int]  # in patches

    def num_tokens(self, merge: int) -> int:
        return image_token_count(self.grid_thw, merge)


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
