"""The whole model in one process: preprocess -> vision tower -> decoder with deepstack -> tokens.

This is `epd generate` and the colocated baseline the disaggregated system is measured against.
It uses the same model halves, preprocessing and input building as the services, with a
contiguous KV cache for one sequence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.config import ModelConfig
from common.dtypes import torch_dtype
from common.tokenizer import ChatTokenizer
from services.encoder.preprocess import PreprocessConfig, preprocess
from services.encoder.weights import load_vision_tower
from services.language.attention import ContiguousKVCache
from services.language.engine.request import SamplingParams
from services.language.engine.sampler import SampleInput, make_generator, sample_rows
from services.language.inputs import expand_image_pads, scatter_images
from services.language.mrope import decode_positions, mrope_positions
from services.language.weights import load_decoder


@dataclass
class GenerateResult:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    finish_reason: str  # "stop" | "length"
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds


class ColocatedPipeline:
    def __init__(self, model_dir: str | Path, dtype: str = "float32", device: str = "cpu") -> None:
        self.dtype, self.device = torch_dtype(dtype), torch.device(device)
        self.cfg = ModelConfig.from_dir(model_dir)
        self.tokenizer = ChatTokenizer(model_dir)
        self.vision = None
        if self.cfg.vision is not None:
            self.preprocess_cfg = PreprocessConfig.from_dir(model_dir)
            self.vision = load_vision_tower(model_dir, self.cfg, self.dtype, self.device)
        self.decoder = load_decoder(model_dir, self.cfg, self.dtype, self.device)
        self.eos_ids = set(self.tokenizer.eos_token_ids or self.cfg.eos_token_ids)

    def encode_images(
        self, images: list[bytes], timings: dict[str, float] | None = None
    ) -> tuple[list[torch.Tensor], list[tuple]]:
        """Wire tensors `[n_tokens, (1+D)*H]` and patch grids of the images, one forward."""
        if self.vision is None:
            raise ValueError(f"{self.cfg.model_type} checkpoint takes no images")
        t0 = time.perf_counter()
        processed = [preprocess(img, self.preprocess_cfg) for img in images]
        pixels = torch.cat([p.pixel_values for p in processed]).to(self.device)
        grids = [p.grid_thw for p in processed]
        t1 = time.perf_counter()
        with torch.inference_mode():
            out = self.vision(pixels, grids)
        if timings is not None:
            timings["preprocess"], timings["encode"] = t1 - t0, time.perf_counter() - t1
        return out, grids

    def prompt_ids(self, prompt: str, num_images: int, counts: list[int]) -> list[int]:
        """One user turn: the images in order, then the text; with the generation prompt."""
        content: list[dict] = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": prompt})
        text = self.tokenizer.render([{"role": "user", "content": content}])
        ids = self.tokenizer.encode(text)
        if num_images:
            assert self.cfg.image_token_id is not None
            ids = expand_image_pads(ids, self.cfg.image_token_id, counts)
        return ids

    @torch.inference_mode()
    def generate(self, images: list[bytes], prompt: str, params: SamplingParams) -> GenerateResult:
        timings = {"preprocess": 0.0, "encode": 0.0}
        embeds_list, grids = self.encode_images(images, timings) if images else ([], [])
        counts = [e.shape[0] for e in embeds_list]
        ids = self.prompt_ids(prompt, len(images), counts)
        return self.generate_from_ids(ids, embeds_list, grids, params, timings)

    @torch.inference_mode()
    def generate_from_ids(
        self,
        ids: list[int],
        images: list[torch.Tensor],
        grids: list[tuple],
        params: SamplingParams,
        timings: dict[str, float] | None = None,
    ) -> GenerateResult:
        """Decode from already expanded prompt ids and the images' wire tensors."""
        timings = {} if timings is None else timings
        t0 = time.perf_counter()
        merge = self.cfg.vision.spatial_merge_size if self.cfg.vision else 2
        image_token = self.cfg.image_token_id if self.cfg.image_token_id is not None else -1
        positions, delta = mrope_positions(ids, image_token, grids, merge)
        input_ids = torch.tensor(ids, device=self.device)
        embeds, deepstack = scatter_images(
            self.decoder.embed(input_ids), input_ids, image_token, images, self.cfg.num_deepstack
        )
        text = self.cfg.text
        cache = ContiguousKVCache(
            text.num_hidden_layers,
            text.num_key_value_heads,
            text.head_dim,
            len(ids) + params.max_tokens,
            self.dtype,
            self.device,
        )
        out: list[int] = []
        stop = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else frozenset(self.eos_ids)
        )
        row = SampleInput(params, make_generator(params.seed, self.device), ids, out, stop)
        hidden = self.decoder(embeds, positions.to(self.device), cache, deepstack)
        cache.commit(len(ids))
        token = sample_rows(self.decoder.compute_logits(hidden[-1:]), [row])[0].token
        timings["prefill"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out.append(token)
        finish = "length"
        while True:
            if token in stop and len(out) >= params.min_tokens:
                finish = "stop"
                break
            if len(out) >= params.max_tokens:
                break
            pos = decode_positions(cache.length, delta).to(self.device)
            step_embeds = self.decoder.embed(torch.tensor([token], device=self.device))
            hidden = self.decoder(step_embeds, pos, cache)
            cache.commit(1)
            token = sample_rows(self.decoder.compute_logits(hidden), [row])[0].token
            out.append(token)
        timings["decode"] = time.perf_counter() - t0
        return GenerateResult(
            token_ids=out,
            text=self.tokenizer.decode(out[:-1] if finish == "stop" else out),
            prompt_tokens=len(ids),
            finish_reason=finish,
            timings=timings,
        )
