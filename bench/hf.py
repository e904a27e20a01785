"""transformers as the reference side of our benchmarks: same checkpoint, same prompt ids.

`HFReference.generate(requests, n_tokens)` runs `generate` over a left-padded batch of one or more
requests (their pixels through transformers' own processor and vision tower) and returns the wall
time of every generated token, taken by a no-op logits processor: the first stamp is the time to
first token, the rest give the per-token decode time.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from common.config import ModelConfig


@dataclass
class HFRequest:
    ids: list[int]  # our prompt ids (equal to transformers' own; see tests/model)
    raw_images: list[bytes]


class HFReference:
    def __init__(self, model_dir: str, cfg: ModelConfig, dtype: torch.dtype, pad_id: int) -> None:
        import transformers as tf

        classes: dict[str, Any] = {
            "qwen3_vl_moe": tf.Qwen3VLMoeForConditionalGeneration,
            "qwen3_vl": tf.Qwen3VLForConditionalGeneration,
            "qwen3_moe": tf.Qwen3MoeForCausalLM,
        }
        self.cfg, self.pad_id = cfg, pad_id
        self.model = classes[cfg.model_type].from_pretrained(model_dir, dtype=dtype).eval()
        self.processor = (
            tf.Qwen2VLImageProcessorPil.from_pretrained(model_dir) if cfg.vision else None
        )

    @torch.inference_mode()
    def generate(self, batch: list[HFRequest], n_tokens: int) -> tuple[float, list[float]]:
        """(start time, one wall-clock stamp per generated token); exactly n_tokens each."""
        from transformers import LogitsProcessor, LogitsProcessorList

        stamps: list[float] = []

        class StepClock(LogitsProcessor):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                stamps.append(time.perf_counter())
                return scores

        start = time.perf_counter()
        inputs = self._inputs(batch)
        if self.cfg.vision is not None:
            self.model.model.rope_deltas = None  # transformers keeps it across calls
        self.model.generate(
            **inputs,
            max_new_tokens=n_tokens,
            min_new_tokens=n_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([StepClock()]),
            pad_token_id=self.pad_id,
        )
        return start, stamps

    def _inputs(self, batch: list[HFRequest]) -> dict[str, Any]:
        width = max(len(r.ids) for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, r in enumerate(batch):  # left padding, as generation needs
            ids[row, width - len(r.ids) :] = torch.tensor(r.ids)
            mask[row, width - len(r.ids) :] = 1
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        raw = [img for r in batch for img in r.raw_images]
        if raw and self.processor is not None:
            pil: list[Any] = [Image.open(io.BytesIO(b)) for b in raw]
            px = self.processor(images=pil, return_tensors="pt")
            out.update(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"])
        if self.cfg.vision is not None:
            out["mm_token_type_ids"] = torch.eq(ids, int(self.cfg.image_token_id or -1)).int()
        return out
