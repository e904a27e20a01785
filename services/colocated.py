"""The whole model in one process: preprocess -> vision tower -> the serving engine -> tokens.

This is `epd generate` and the colocated baseline the disaggregated system is measured against
(`epd bench --compare-colocated`). It runs the services' own code with the transfer and the
processes taken out: the encoder's preprocessing and vision tower, and the language service's
`Engine` (continuous batching over the paged KV cache, the same scheduler and sampler), so that a
comparison with the stack measures disaggregation and nothing else. Every torch call runs on the
process's torch thread, as in the services. With `--tensor-parallel-size N` the engine spawns
N-1 worker processes (multiprocessing's spawn): a script that builds a pipeline keeps its work
under `if __name__ == "__main__":`, as with any spawn-based library; `close()` stops them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from common.contract import (
    FinishReason,
    PreprocessConfig,
    SamplingParams,
    VideoPreprocessConfig,
    VideoSampling,
    expand_image_pads,
    expand_video_placeholders,
    image_pad_runs,
    resolve_max_tokens,
)
from common.dtypes import torch_dtype
from common.tokenizer import ChatTokenizer
from common.torch_thread import call_on_torch_thread, run_on_torch_thread
from services.encoder.preprocess import preprocess
from services.encoder.video import ProcessedVideo, preprocess_video
from services.encoder.weights import load_vision_tower
from services.language.engine.builder import EngineConfig, build_engine
from services.language.engine.engine import Engine, ImageInput, TokenEvent, in_prompt_order

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Media:
    """An image or video file in a user turn (`Part`s are these or text)."""

    kind: str  # "image" | "video"
    data: bytes


Part = str | Media


@dataclass
class Inputs:
    """A request's prompt as the language service receives it: ids with every placeholder
    expanded, the visual items in prompt order (a video as its temporal patches) and their
    spans; `videos` keeps each video's preprocessing for callers that inspect it."""

    ids: list[int]
    items: list[ImageInput]
    spans: list[tuple[int, int]]
    videos: list[ProcessedVideo] = field(default_factory=list)
    video_outputs: list[torch.Tensor] = field(default_factory=list)


@dataclass
class GenerateResult:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    finish_reason: str  # "stop" | "length"
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds


class ColocatedPipeline:
    def __init__(
        self,
        model_dir: str | Path,
        dtype: str = "float32",
        device: str = "cpu",
        engine: EngineConfig | None = None,
    ) -> None:
        """`engine` overrides the engine settings (its model, dtype and device are ours)."""
        self.dtype, self.device = torch_dtype(dtype), torch.device(device)
        cfg = replace(engine or EngineConfig(str(model_dir)), model=str(model_dir), dtype=dtype,
                      device=device)  # fmt: skip
        self.engine: Engine = call_on_torch_thread(build_engine, cfg)
        self.cfg = self.engine.cfg
        self.decoder = self.engine.runner.model
        self.tokenizer = ChatTokenizer(model_dir)
        self.vision = None
        if self.cfg.vision is not None:
            self.preprocess_cfg = PreprocessConfig.from_dir(model_dir)
            self.video_cfg = VideoPreprocessConfig.from_dir(model_dir)
            self.vision = call_on_torch_thread(
                load_vision_tower, model_dir, self.cfg, self.dtype, self.device
            )

    def close(self) -> None:
        """Stop what the engine runs outside this process (tensor-parallel workers)."""
        call_on_torch_thread(self.engine.close)

    def encode_images(
        self, images: Sequence[bytes], timings: dict[str, float] | None = None
    ) -> tuple[list[torch.Tensor], list[tuple[int, int, int]]]:
        """Wire tensors `[n_tokens, (1+D)*H]` and patch grids of the images, one forward."""
        return call_on_torch_thread(self._encode, list(images), timings)

    def _encode(
        self, images: list[bytes], timings: dict[str, float] | None
    ) -> tuple[list[torch.Tensor], list[tuple[int, int, int]]]:
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

    def encode_videos(
        self, videos: Sequence[bytes], sampling: VideoSampling | None = None
    ) -> tuple[list[torch.Tensor], list[ProcessedVideo]]:
        """Wire tensors `[n_tokens, (1+D)*H]` of whole videos (one forward), and their
        preprocessing (grid, timestamps, pixel values)."""
        return call_on_torch_thread(self._encode_videos, list(videos), sampling, None)

    def _encode_videos(
        self,
        videos: list[bytes],
        sampling: VideoSampling | None,
        timings: dict[str, float] | None,
    ) -> tuple[list[torch.Tensor], list[ProcessedVideo]]:
        if self.vision is None:
            raise ValueError(f"{self.cfg.model_type} checkpoint takes no videos")
        t0 = time.perf_counter()
        sampling = sampling or self.video_cfg.sampling()
        processed = [preprocess_video(v, sampling, self.video_cfg) for v in videos]
        pixels = torch.cat([p.pixel_values for p in processed]).to(self.device)
        t1 = time.perf_counter()
        with torch.inference_mode():
            out = self.vision(pixels, [p.grid_thw for p in processed])
        if timings is not None:
            timings["preprocess"] = timings.get("preprocess", 0.0) + t1 - t0
            timings["encode"] = timings.get("encode", 0.0) + time.perf_counter() - t1
        return out, processed

    def parts_inputs(
        self, parts: Sequence[Part], sampling: VideoSampling | None = None,
        timings: dict[str, float] | None = None,
    ) -> Inputs:  # fmt: skip
        """One user turn of text, images and videos in the given order (on any thread)."""
        return call_on_torch_thread(self._parts_inputs, list(parts), sampling, timings)

    def _parts_inputs(
        self, parts: list[Part], sampling: VideoSampling | None, timings: dict[str, float] | None
    ) -> Inputs:
        timings = {} if timings is None else timings
        timings.setdefault("preprocess", 0.0)
        timings.setdefault("encode", 0.0)
        images = [p.data for p in parts if isinstance(p, Media) and p.kind == "image"]
        videos = [p.data for p in parts if isinstance(p, Media) and p.kind == "video"]
        image_out, grids = self._encode(images, timings) if images else ([], [])
        video_out, processed = (
            self._encode_videos(videos, sampling, timings) if videos else ([], [])
        )
        content = [_content(p) for p in parts]
        text = self.tokenizer.render([{"role": "user", "content": content}])
        text = expand_video_placeholders(text, [p.chunk.timestamps for p in processed])
        ids = self.tokenizer.encode(text)
        patch_counts = [[t.shape[0] // p.grid_thw[0]] * p.grid_thw[0]
                        for t, p in zip(video_out, processed, strict=True)]  # fmt: skip
        flat = [n for counts in patch_counts for n in counts]
        if images or videos:
            assert self.cfg.image_token_id is not None
            ids = expand_image_pads(ids, self.cfg.image_token_id, [t.shape[0] for t in image_out],
                                    self.cfg.video_token_id, flat)  # fmt: skip
        image_spans = image_pad_runs(ids, self.cfg.image_token_id, [t.shape[0] for t in image_out])
        runs = image_pad_runs(ids, self.cfg.video_token_id, flat, "video patch")
        video_spans, at = [], 0
        for counts in patch_counts:
            video_spans.append(runs[at : at + len(counts)])
            at += len(counts)
        items, spans = in_prompt_order(
            [ImageInput.of(t, g) for t, g in zip(image_out, grids, strict=True)],
            image_spans,
            [ImageInput.video_patches(t, p.grid_thw) for t, p in zip(video_out, processed,
                                                                     strict=True)],
            video_spans,
        )  # fmt: skip
        return Inputs(ids, items, spans, processed, video_out)

    def generate_parts(
        self, parts: Sequence[Part], params: SamplingParams, sampling: VideoSampling | None = None
    ) -> GenerateResult:
        """One user turn of text, images and videos in any order, start to end."""
        timings: dict[str, float] = {}
        inputs = self.parts_inputs(parts, sampling, timings)
        return asyncio.run(self._alone(self.agenerate_from_ids(
            inputs.ids, inputs.items, params, timings, inputs.spans)))  # fmt: skip

    def generate(
        self, images: Sequence[bytes], prompt: str, params: SamplingParams
    ) -> GenerateResult:
        """One request, start to end (an event loop of its own runs the engine meanwhile)."""
        return asyncio.run(self._alone(self.agenerate(images, prompt, params)))

    def generate_from_ids(
        self,
        ids: list[int],
        images: Sequence[torch.Tensor],
        grids: Sequence[tuple[int, int, int]],
        params: SamplingParams,
        spans: Sequence[tuple[int, int]] | None = None,
    ) -> GenerateResult:
        """Decode from already expanded prompt ids and the visual items' wire tensors (prompt
        order; `spans` their runs, needed when videos are among them)."""
        inputs = [ImageInput.of(t, g) for t, g in zip(images, grids, strict=True)]
        return asyncio.run(self._alone(self.agenerate_from_ids(ids, inputs, params, {}, spans)))

    async def _alone(self, work: Coroutine[Any, Any, T]) -> T:
        """`work` with the engine running in this event loop."""
        await self.engine.start()
        try:
            return await work
        finally:
            await self.engine.stop()

    async def agenerate(
        self, images: Sequence[bytes], prompt: str, params: SamplingParams
    ) -> GenerateResult:
        """One request on the running engine (`engine.start()` first); requests run
        concurrently batch together, as in the language service."""
        timings: dict[str, float] = {}
        ids, inputs = await self.inputs(images, prompt, timings)
        return await self.agenerate_from_ids(ids, inputs, params, timings)

    async def inputs(
        self, images: Sequence[bytes], prompt: str, timings: dict[str, float]
    ) -> tuple[list[int], list[ImageInput]]:
        """Prompt ids and pulled-image inputs, as the language service would receive them."""
        timings.update(preprocess=0.0, encode=0.0)
        tensors: list[torch.Tensor] = []
        grids: list[tuple[int, int, int]] = []
        if images:
            tensors, grids = await run_on_torch_thread(self._encode, list(images), timings)
        ids = self.prompt_ids(prompt, len(images), [t.shape[0] for t in tensors])
        return ids, [ImageInput.of(t, g) for t, g in zip(tensors, grids, strict=True)]

    async def stream(
        self,
        ids: list[int],
        images: Sequence[ImageInput],
        params: SamplingParams,
        spans: Sequence[tuple[int, int]] | None = None,
    ) -> AsyncIterator[TokenEvent]:
        """The engine's events for one request (`spans`: each visual item's run, needed when
        videos are among them). Raises ContractError (a ValueError) naming both numbers when
        prompt + max_tokens does not fit max_model_len."""
        budget = resolve_max_tokens(
            len(ids), params.max_tokens, self.engine.max_model_len, params.min_tokens
        )
        bounded = replace(params, max_tokens=budget)
        async for event in self.engine.generate(ids, bounded, images, spans=spans):
            yield event

    async def agenerate_from_ids(
        self,
        ids: list[int],
        images: Sequence[ImageInput],
        params: SamplingParams,
        timings: dict[str, float],
        spans: Sequence[tuple[int, int]] | None = None,
    ) -> GenerateResult:
        out: list[int] = []
        finish = FinishReason.LENGTH
        async for event in self.stream(ids, images, params, spans):
            if event.sample is not None:
                out.append(event.sample.token)
            if event.finish_reason is not None:
                finish = event.finish_reason
                timings["prefill"], timings["decode"] = event.prefill_s, event.decode_s
        if finish not in (FinishReason.STOP, FinishReason.LENGTH):
            raise RuntimeError(f"generation ended with {finish}")
        return GenerateResult(
            token_ids=out,
            text=self.tokenizer.decode(out[:-1] if finish == FinishReason.STOP else out),
            prompt_tokens=len(ids),
            finish_reason=str(finish),
            timings=timings,
        )


def _content(part: Part) -> dict[str, str]:
    if isinstance(part, Media):
        return {"type": part.kind}
    return {"type": "text", "text": part}
