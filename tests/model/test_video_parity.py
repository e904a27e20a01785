"""Video through our preprocessing, tower and engine against transformers' own Qwen3VLProcessor
(its PyAV loader and Qwen3VLVideoProcessor) and Qwen3VLMoeForConditionalGeneration, fp32."""

from __future__ import annotations

import pytest
import torch

from common.contract import SamplingParams
from services.colocated import ColocatedPipeline, Media
from services.encoder.video import preprocess_video
from services.language.engine.engine import ImageInput, in_prompt_order

# (width, height, frames, fps, seed) of each video; the long one has 12 temporal patches.
SHORT = (64, 48, 40, 10, 1)
ODD = (80, 64, 45, 10, 2)  # 9 sampled frames: the last temporal patch repeats the last frame
LONG = (64, 64, 120, 10, 3)


def cases(video, png):
    return {
        "video+text": [Media("video", video(*SHORT)), "Describe this video."],
        "video+image+text": [
            Media("video", video(*ODD)),
            Media("image", png(96, 64, 4)),
            "What changes between them?",
        ],
        "text-before-video": ["Watch this:", Media("video", video(*SHORT[:4], 5))],
        "long-video": [Media("video", video(*LONG)), "Summarize."],
    }


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return ColocatedPipeline(tiny_model)


@pytest.mark.parametrize(
    "case", ["video+text", "video+image+text", "text-before-video", "long-video"]
)
def test_video_prompt_vision_and_greedy_tokens_match_transformers(
    tiny_model, oracle, video, png, pipe, case
):
    parts = cases(video, png)[case]
    hf = oracle(tiny_model)
    ref = hf.parts_inputs(parts)
    ours = pipe.parts_inputs(parts)
    assert ours.ids == ref["input_ids"][0].tolist()  # timestamps and pad runs included
    assert [p.grid_thw for p in ours.videos] == [tuple(g) for g in ref["video_grid_thw"].tolist()]
    assert torch.equal(torch.cat([p.pixel_values for p in ours.videos]), ref["pixel_values_videos"])
    vision = hf.vision(ref["pixel_values_videos"], ref["video_grid_thw"])
    h = pipe.cfg.text.hidden_size
    levels = [vision.pooler_output, *vision.deepstack_features]
    sizes = [t.shape[0] for t in ours.video_outputs]
    for j, level in enumerate(levels):
        for out, expected in zip(ours.video_outputs, level.split(sizes), strict=True):
            assert (out[:, j * h : (j + 1) * h] - expected).abs().max().item() < 1e-5
    result = pipe.generate_parts(parts, SamplingParams(max_tokens=16))
    assert result.token_ids == hf.generate(ref, 16)


def test_per_request_fps_and_max_frames_match_transformers(tiny_model, oracle, video, pipe):
    parts = [Media("video", video(*LONG)), "Describe."]
    sampling = pipe.video_cfg.sampling(fps=4.0, max_frames=6)
    ours = pipe.parts_inputs(parts, sampling)
    ref = oracle(tiny_model).parts_inputs(parts, fps=4.0, max_frames=6)
    assert ours.ids == ref["input_ids"][0].tolist()
    assert ours.videos[0].grid_thw == (3, 4, 4)


def test_a_video_encoded_in_chunks_of_temporal_patches_equals_the_whole(
    tiny_model, oracle, video, pipe
):
    """What two encoders make of a long video's halves, joined, is the whole video's output
    (within 1e-5), and the engine generates the same tokens from the chunks."""
    data = video(*LONG)
    parts = [Media("video", data), "Summarize."]
    whole = pipe.parts_inputs(parts)
    sampling, cfg = pipe.video_cfg.sampling(), pipe.video_cfg
    chunks = [
        preprocess_video(data, sampling, cfg, first, count) for first, count in ((0, 5), (5, 7))
    ]
    assert [c.chunk.timestamps for c in chunks] == [
        whole.videos[0].chunk.timestamps[:5],
        whole.videos[0].chunk.timestamps[5:],
    ]
    outs = [pipe.vision(c.pixel_values, [c.grid_thw])[0] for c in chunks]
    joined = torch.cat(outs)
    assert joined.shape == whole.video_outputs[0].shape
    assert (joined - whole.video_outputs[0]).abs().max().item() < 1e-5
    spans = [s for s in whole.spans]
    patches = [
        p
        for c, o in zip(chunks, outs, strict=True)
        for p in ImageInput.video_patches(o, c.grid_thw)
    ]
    items, spans = in_prompt_order([], [], [patches], [spans])
    params = SamplingParams(max_tokens=16)
    result = pipe.generate_from_ids(
        whole.ids, [i.tensor for i in items], [i.grid_thw for i in items], params, spans
    )
    hf = oracle(tiny_model)
    assert result.token_ids == hf.generate(hf.parts_inputs(parts), 16)
