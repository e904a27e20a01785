"""Image decoding and resizing rules, and the errors bad images get."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from services.encoder.preprocess import PreprocessConfig, preprocess, smart_resize

CFG = PreprocessConfig(min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 64)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_common_formats_decode(fmt):
    img = Image.new("RGB", (100, 70), (10, 200, 30))
    out = preprocess(encode(img, fmt), CFG)
    t, h, w = out.grid_thw
    assert t == 1 and h % 2 == 0 and w % 2 == 0
    assert out.pixel_values.shape == (h * w, 3 * 2 * 16 * 16)


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (64, 64), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    first = preprocess(encode(frames[0], "GIF"), CFG)
    assert preprocess(data, CFG).pixel_values.equal(first.pixel_values)


def test_transparency_is_composited_on_white():
    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    assert preprocess(encode(clear, "PNG"), CFG).pixel_values.equal(
        preprocess(encode(white, "PNG"), CFG).pixel_values
    )


def test_smart_resize_bounds():
    assert smart_resize(64, 64, CFG) == (64, 64)
    h, w = smart_resize(10, 10, CFG)  # below min_pixels -> scaled up
    assert h * w >= CFG.min_pixels and h % 32 == 0 and w % 32 == 0
    h, w = smart_resize(2000, 1000, CFG)  # above max_pixels -> scaled down
    assert h * w <= CFG.max_pixels and h % 32 == 0 and w % 32 == 0


def test_corrupt_bytes_are_rejected_with_a_reason():
    png = encode(Image.new("RGB", (64, 64)), "PNG")
    with pytest.raises(ValueError, match="cannot decode image"):
        preprocess(b"definitely not an image", CFG)
    with pytest.raises(ValueError, match="cannot decode image"):
        preprocess(png[: len(png) // 2], CFG)


def test_empty_bytes_are_rejected():
    with pytest.raises(ValueError, match="empty"):
        preprocess(b"", CFG)


def test_extreme_aspect_ratio_is_rejected():
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess(encode(Image.new("RGB", (4020, 20)), "PNG"), CFG)


def test_pixel_cap_is_enforced_before_decoding():
    cfg = PreprocessConfig(max_input_pixels=100 * 100)
    with pytest.raises(ValueError, match="over the limit"):
        preprocess(encode(Image.new("RGB", (101, 100)), "PNG"), cfg)


def test_config_reads_both_processor_file_layouts(tmp_path, tiny_model):
    from_preprocessor = PreprocessConfig.from_dir(tiny_model)
    nested = {"image_processor": {"size": {"shortest_edge": 4096, "longest_edge": 65536}}}
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    from_processor = PreprocessConfig.from_dir(tmp_path)
    assert (from_preprocessor.min_pixels, from_preprocessor.max_pixels) == (4096, 65536)
    assert from_processor.cache_key == from_preprocessor.cache_key
    with pytest.raises(ValueError, match="no preprocessor_config.json"):
        PreprocessConfig.from_dir(tmp_path / "nowhere")
