"""Shared fixtures: tiny random checkpoints built once per session, and the numerical reference
(transformers' own classes on the same checkpoint files)."""

from __future__ import annotations

import functools
import io
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

from services.tiny_model import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3-VL-MoE, tiny preset, deepstack [1, 2, 3] (D = 3), transformers 5.x expert layout."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-vl-moe"), preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model_d2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3-VL-MoE with two deepstack levels (blocks 0 and 2) instead of three."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-vl-moe-d2"), seed=1, deepstack=(0, 2))


@pytest.fixture(scope="session")
def tiny_dense_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-vl"), seed=2, arch="qwen3_vl")


@pytest.fixture(scope="session")
def tiny_text_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-moe"), seed=3, arch="qwen3_moe")


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3-VL-MoE, small preset: hidden 512, expert intermediate 384, 16 experts top-4 (sizes
    the C++ CPU expert kernel takes, unlike the tiny preset's)."""
    return make_tiny_model(tmp_path_factory.mktemp("small-vl-moe"), preset="small", seed=0)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test CA and two certificates it signed, made with the openssl CLI: `server` (for
    localhost and 127.0.0.1) and `client`. Keys are "<name>.key", certificates "<name>.crt"."""
    d = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ca_key, ca_crt = str(d / "ca.key"), str(d / "ca.crt")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=epd test CA", "-keyout", ca_key, "-out", ca_crt)  # fmt: skip
    for name, san in (("server", "DNS:localhost,IP:127.0.0.1"), ("client", "DNS:client")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))  # fmt: skip
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", ca_crt,
                "-CAkey", ca_key, "-CAcreateserial", "-days", "1",
                "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.crt"))  # fmt: skip
    return {p.name: p for p in d.iterdir()}


@pytest.fixture(scope="session")
def png():
    """`png(width, height, seed=0, mode="RGB") -> bytes`: a deterministic noise image as PNG."""
    return png_bytes


@pytest.fixture(scope="session")
def video():
    """`video(width, height, frames, fps=10, seed=0, codec="libx264", container="mp4",
    options=None) -> bytes`: a synthetic video file (`bench.media.synthetic_video`)."""
    from bench.media import synthetic_video

    return synthetic_video


def png_bytes(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
    """A deterministic noise image encoded as PNG."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    img = Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode=mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


ORACLE_CLASSES = {
    "qwen3_vl_moe": tf.Qwen3VLMoeForConditionalGeneration,
    "qwen3_vl": tf.Qwen3VLForConditionalGeneration,
    "qwen3_moe": tf.Qwen3MoeForCausalLM,
}


class HFOracle:
    """transformers' model, tokenizer and PIL image processor for one checkpoint directory.

    Pinned: sdpa attention and the eager experts loop (the default grouped_mm differs from it by
    ~2e-7 in fp32), so a parity failure means our code changed, not the reference's kernels.
    """

    def __init__(self, model_dir: Path, dtype: torch.dtype = torch.float32) -> None:
        self.model_dir = model_dir
        self.model_type = json.loads((model_dir / "config.json").read_text())["model_type"]
        self.model = (
            ORACLE_CLASSES[self.model_type]
            .from_pretrained(
                model_dir, dtype=dtype, attn_implementation="sdpa", experts_implementation="eager"
            )
            .eval()
        )
        self.tokenizer = tf.AutoTokenizer.from_pretrained(model_dir)
        self.vl = self.model_type != "qwen3_moe"
        self.processor = tf.Qwen2VLImageProcessorPil.from_pretrained(model_dir) if self.vl else None

    def inputs(self, images: list[bytes], prompt: str) -> dict[str, Any]:
        content: list[dict] = [{"type": "image"} for _ in images]
        content.append({"type": "text", "text": prompt})
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        out: dict[str, Any] = {}
        if images:
            pil = [Image.open(io.BytesIO(b)) for b in images]
            px = self.processor(images=pil, return_tensors="pt")
            out["pixel_values"], out["image_grid_thw"] = px["pixel_values"], px["image_grid_thw"]
            # What Qwen3VLProcessor does: expand each placeholder to t*h*w/4 pads, in order.
            pieces = text.split("<|image_pad|>")
            counts = [int(g.prod()) // 4 for g in px["image_grid_thw"]]
            text = pieces[0] + "".join(
                "<|image_pad|>" * n + rest for n, rest in zip(counts, pieces[1:], strict=True)
            )
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out["input_ids"] = ids
        if self.vl:
            out["mm_token_type_ids"] = (ids == self.model.config.image_token_id).int()
        return out

    def parts_inputs(
        self, parts: list[Any], fps: float | None = None, max_frames: int | None = None
    ) -> dict[str, Any]:
        """One user turn of text (str) and media (`colocated.Media`) in order, through
        transformers' own `Qwen3VLProcessor`: videos decoded by transformers' PyAV loader
        (`load_video(backend="pyav")`) and sampled by its `Qwen3VLVideoProcessor`."""
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
        from transformers.video_utils import load_video

        vp = Qwen3VLVideoProcessor.from_pretrained(self.model_dir)
        if max_frames is not None:
            vp.max_frames = max_frames
        processor = tf.Qwen3VLProcessor(
            image_processor=self.processor, tokenizer=self.tokenizer, video_processor=vp,
            chat_template=self.tokenizer.chat_template,
        )  # fmt: skip
        content: list[dict] = []
        images, videos, metadata = [], [], []
        with tempfile.TemporaryDirectory() as tmp:
            for i, part in enumerate(parts):
                if isinstance(part, str):
                    content.append({"type": "text", "text": part})
                elif part.kind == "image":
                    content.append({"type": "image"})
                    images.append(Image.open(io.BytesIO(part.data)))
                else:
                    content.append({"type": "video"})
                    path = Path(tmp) / f"video{i}"
                    path.write_bytes(part.data)
                    sample = functools.partial(vp.sample_frames, fps=fps)
                    frames, meta = load_video(str(path), backend="pyav", sample_indices_fn=sample)
                    videos.append(frames)
                    metadata.append(meta)
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
            out = processor(
                text=[text], images=images or None, videos=videos or None,
                video_metadata=metadata or None, do_sample_frames=False, return_tensors="pt",
            )  # fmt: skip
        return dict(out)

    @torch.inference_mode()
    def logits(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Prefill logits `[T, V]` for every prompt position."""
        if self.vl:
            self.model.model.rope_deltas = None  # stateful across calls in transformers
        return self.model(**inputs).logits[0]

    @torch.inference_mode()
    def generate(self, inputs: dict[str, Any], max_new_tokens: int) -> list[int]:
        if self.vl:
            self.model.model.rope_deltas = None
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, inputs["input_ids"].shape[1] :].tolist()

    @torch.inference_mode()
    def vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> Any:
        return self.model.model.visual(pixel_values, grid_thw=grid_thw)


@pytest.fixture(scope="session")
def oracle():
    """`oracle(model_dir, dtype=torch.float32) -> HFOracle`, cached per (dir, dtype)."""
    cache: dict[tuple[Path, torch.dtype], HFOracle] = {}

    def get(model_dir: Path, dtype: torch.dtype = torch.float32) -> HFOracle:
        if (model_dir, dtype) not in cache:
            cache[(model_dir, dtype)] = HFOracle(model_dir, dtype)
        return cache[(model_dir, dtype)]

    return get
