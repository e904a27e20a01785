"""Our model halves against transformers on tiny random checkpoints (fp32 unless stated)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.contract import SamplingParams
from services.colocated import ColocatedPipeline
from services.encoder.preprocess import preprocess
from services.language.attention import ContiguousKVCache
from services.language.inputs import scatter_images
from services.language.mrope import mrope_positions
from services.tiny_model import make_tiny_model
from tests.checkpoints import per_expert_copy

PROMPT = "Describe these images in detail."


def prefill_logits(
    pipe: ColocatedPipeline, images: list[bytes], prompt: str, drop_deepstack: bool = False
) -> tuple[list[int], torch.Tensor]:
    """Our prompt ids and prefill logits `[T, V]` (the same path as `epd generate`)."""
    with torch.inference_mode():
        embeds, grids = pipe.encode_images(images) if images else ([], [])
        ids = pipe.prompt_ids(prompt, len(images), [e.shape[0] for e in embeds])
        image_token = pipe.cfg.image_token_id if pipe.cfg.image_token_id is not None else -1
        positions, _ = mrope_positions(ids, image_token, grids, 2)
        input_ids = torch.tensor(ids)
        x, deepstack = scatter_images(
            pipe.decoder.embed(input_ids), input_ids, image_token, embeds, pipe.cfg.num_deepstack
        )
        t = pipe.cfg.text
        cache = ContiguousKVCache(
            t.num_hidden_layers, t.num_key_value_heads, t.head_dim, len(ids), pipe.dtype
        )
        hidden = pipe.decoder(x, positions, cache, None if drop_deepstack else deepstack)
        return ids, pipe.decoder.compute_logits(hidden)


IMAGE_CASES = {
    "two-images": [(150, 100, 1), (64, 96, 2)],
    "one-image": [(200, 120, 3)],
    "no-image": [],
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_prefill_and_greedy_decode_match_transformers(tiny_model, oracle, png, case):
    images = [png(w, h, seed) for w, h, seed in IMAGE_CASES[case]]
    hf = oracle(tiny_model)
    pipe = ColocatedPipeline(tiny_model)
    inputs = hf.inputs(images, PROMPT)
    ids, ours = prefill_logits(pipe, images, PROMPT)
    assert ids == inputs["input_ids"][0].tolist()
    ref = hf.logits(inputs)
    assert (ours - ref).abs().max().item() < 1e-4
    params = SamplingParams(max_tokens=16, temperature=0.0)
    result = pipe.generate(images, PROMPT, params)
    assert result.token_ids == hf.generate(inputs, 16)


def test_vision_tower_matches_transformers_per_image_and_level(tiny_model, oracle, png):
    hf = oracle(tiny_model)
    pipe = ColocatedPipeline(tiny_model)
    # 150x100 is resized inside the bounds; 40x30 hits min_pixels; 600x400 hits max_pixels.
    images = [png(150, 100, 1), png(40, 30, 2), png(600, 400, 3)]
    inputs = hf.inputs(images, PROMPT)
    ref = hf.vision(inputs["pixel_values"], inputs["image_grid_thw"])
    ours, grids = pipe.encode_images(images)
    assert grids == [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    h = pipe.cfg.text.hidden_size
    sizes = [e.shape[0] for e in ours]
    levels = [ref.pooler_output, *ref.deepstack_features]
    assert len(levels) == 4 and all(e.shape[1] == 4 * h for e in ours)
    for j, level in enumerate(levels):
        for img, expected in zip(ours, level.split(sizes), strict=True):
            assert (img[:, j * h : (j + 1) * h] - expected).abs().max().item() < 1e-5


def test_image_output_is_independent_of_batch(tiny_model, png):
    pipe = ColocatedPipeline(tiny_model)
    a, b = png(150, 100, 1), png(64, 96, 2)
    alone, _ = pipe.encode_images([a])
    batched, _ = pipe.encode_images([b, a])
    assert torch.equal(alone[0], batched[1])


def test_deepstack_count_comes_from_config(tiny_model_d2, oracle, png):
    images = [png(150, 100, 5)]
    hf = oracle(tiny_model_d2)
    pipe = ColocatedPipeline(tiny_model_d2)
    assert pipe.cfg.num_deepstack == 2
    embeds, _ = pipe.encode_images(images)
    assert embeds[0].shape[1] == 3 * pipe.cfg.text.hidden_size
    inputs = hf.inputs(images, PROMPT)
    _, ours = prefill_logits(pipe, images, PROMPT)
    assert (ours - hf.logits(inputs)).abs().max().item() < 1e-4
    assert pipe.generate(images, PROMPT, SamplingParams(max_tokens=16)).token_ids == hf.generate(
        inputs, 16
    )


def test_dense_qwen3_vl_matches_transformers(tiny_dense_vl, oracle, png):
    images = [png(120, 160, 7)]
    hf = oracle(tiny_dense_vl)
    pipe = ColocatedPipeline(tiny_dense_vl)
    inputs = hf.inputs(images, PROMPT)
    _, ours = prefill_logits(pipe, images, PROMPT)
    assert (ours - hf.logits(inputs)).abs().max().item() < 1e-4
    assert pipe.generate(images, PROMPT, SamplingParams(max_tokens=16)).token_ids == hf.generate(
        inputs, 16
    )


def test_plain_qwen3_moe_text_checkpoint_matches_transformers(tiny_text_moe, oracle):
    hf = oracle(tiny_text_moe)
    pipe = ColocatedPipeline(tiny_text_moe)
    assert pipe.vision is None and pipe.cfg.text_prefix == "model."
    inputs = hf.inputs([], "Tell me a story about a fox.")
    ids, ours = prefill_logits(pipe, [], "Tell me a story about a fox.")
    assert ids == inputs["input_ids"][0].tolist()
    assert (ours - hf.logits(inputs)).abs().max().item() < 1e-4
    result = pipe.generate([], "Tell me a story about a fox.", SamplingParams(max_tokens=16))
    assert result.token_ids == hf.generate(inputs, 16)


def test_hub_expert_layout_loads_to_the_same_model(tiny_model, tmp_path, png, oracle):
    """Hub checkpoints (transformers 4.57 era) store gate_up [E,H,2I] and down [E,I,H]."""
    hub = tmp_path / "hub-layout"
    hub.mkdir()
    for f in tiny_model.iterdir():
        if f.name != "model.safetensors":
            (hub / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tiny_model / "model.safetensors")
    swapped = 0
    for key in list(tensors):
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[key] = tensors[key].transpose(1, 2).contiguous()
            swapped += 1
    assert swapped == 2 * 4
    save_file(tensors, hub / "model.safetensors", metadata={"format": "pt"})
    images = [png(150, 100, 1)]
    _, v5 = prefill_logits(ColocatedPipeline(tiny_model), images, PROMPT)
    _, from_hub = prefill_logits(ColocatedPipeline(hub), images, PROMPT)
    assert torch.equal(v5, from_hub)
    hf = oracle(tiny_model)
    assert (from_hub - hf.logits(hf.inputs(images, PROMPT))).abs().max().item() < 1e-4


def test_make_tiny_model_writes_the_hub_layout_on_request(tiny_model, tmp_path, png, oracle):
    """`expert_layout="hub"`: the same seed's weights with the fused experts transposed, and a
    config with norm_topk_prob (what vLLM reads); both loaders give the same model."""
    hub = make_tiny_model(tmp_path / "hub", preset="tiny", seed=0, expert_layout="hub")
    ref, ours = load_file(tiny_model / "model.safetensors"), load_file(hub / "model.safetensors")
    assert ref.keys() == ours.keys()
    fused = [k for k in ref if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(fused) == 2 * 4
    for key, t in ref.items():
        assert torch.equal(ours[key], t.transpose(1, 2) if key in fused else t), key
    assert json.loads((hub / "config.json").read_text())["text_config"]["norm_topk_prob"] is True
    images = [png(150, 100, 1)]
    _, v5 = prefill_logits(ColocatedPipeline(tiny_model), images, PROMPT)
    _, from_hub = prefill_logits(ColocatedPipeline(hub), images, PROMPT)
    assert torch.equal(v5, from_hub)
    hf_hub = oracle(hub)
    assert (from_hub - hf_hub.logits(hf_hub.inputs(images, PROMPT))).abs().max().item() < 1e-4


def test_per_expert_text_checkpoint_loads_to_the_same_model(tiny_text_moe, tmp_path):
    """Plain Qwen3-MoE hub checkpoints store one gate/up/down tensor per expert."""
    split = per_expert_copy(tiny_text_moe, tmp_path / "per-expert")
    _, fused = prefill_logits(ColocatedPipeline(tiny_text_moe), [], PROMPT)
    _, per_expert = prefill_logits(ColocatedPipeline(split), [], PROMPT)
    assert torch.equal(fused, per_expert)


def test_sharded_checkpoint_loads(tiny_model, tmp_path, png):
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for f in tiny_model.iterdir():
        if f.name != "model.safetensors":
            (sharded / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tiny_model / "model.safetensors")
    keys = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    weight_map = {}
    for name, shard_keys in shards.items():
        save_file({k: tensors[k] for k in shard_keys}, sharded / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard_keys})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    images = [png(150, 100, 1)]
    _, single = prefill_logits(ColocatedPipeline(tiny_model), images, PROMPT)
    _, from_shards = prefill_logits(ColocatedPipeline(sharded), images, PROMPT)
    assert torch.equal(single, from_shards)


def test_bfloat16_stays_within_stated_tolerance(tiny_model, oracle, png):
    """bf16 on both sides: logits within 0.05 of transformers' bf16 (an 8-bit mantissa)."""
    images = [png(150, 100, 1), png(64, 96, 2)]
    hf = oracle(tiny_model, torch.bfloat16)
    pipe = ColocatedPipeline(tiny_model, dtype="bfloat16")
    _, ours = prefill_logits(pipe, images, PROMPT)
    ref = hf.logits(hf.inputs(images, PROMPT))
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - ref.float()).abs().max().item() < 5e-2
    assert ours[-1].argmax() == ref[-1].argmax()


@pytest.mark.parametrize("mode", ["none", "before"])
def test_parity_check_detects_misplaced_deepstack(tiny_model, oracle, png, mode):
    """Deepstack skipped, or added before the layer instead of after, breaks the 1e-4 parity."""
    images = [png(150, 100, 1)]
    hf = oracle(tiny_model)
    pipe = ColocatedPipeline(tiny_model)
    ref = hf.logits(hf.inputs(images, PROMPT))
    if mode == "none":
        _, wrong = prefill_logits(pipe, images, PROMPT, drop_deepstack=True)
    else:
        wrong = _prefill_with_deepstack_before_layers(pipe, images)
    assert (wrong - ref).abs().max().item() > 1e-2


def _prefill_with_deepstack_before_layers(pipe: ColocatedPipeline, images: list[bytes]):
    with torch.inference_mode():
        embeds, grids = pipe.encode_images(images)
        ids = pipe.prompt_ids(PROMPT, len(images), [e.shape[0] for e in embeds])
        positions, _ = mrope_positions(ids, pipe.cfg.image_token_id, grids, 2)
        input_ids = torch.tensor(ids)
        x, deepstack = scatter_images(
            pipe.decoder.embed(input_ids), input_ids, pipe.cfg.image_token_id, embeds, 3
        )
        t = pipe.cfg.text
        cache = ContiguousKVCache(
            t.num_hidden_layers, t.num_key_value_heads, t.head_dim, len(ids), pipe.dtype
        )
        body = pipe.decoder.model
        cos, sin = body.rotary_emb(positions, x.dtype)
        h = t.hidden_size
        for i, layer in enumerate(body.layers):
            if i < 3:
                x = x + deepstack[:, i * h : (i + 1) * h]
            x = layer(x, cos, sin, cache)
        return pipe.decoder.compute_logits(x)


def test_preprocessing_matches_transformers_pil_processor(tiny_model, oracle, png):
    hf = oracle(tiny_model)
    pipe = ColocatedPipeline(tiny_model)
    cases = [png(150, 100, 1), png(40, 30, 2), png(600, 400, 3), png(333, 77, 4, "RGBA"),
             png(64, 64, 5, "L"), png(1000, 24, 6)]  # fmt: skip
    for data in cases:
        ref = hf.processor(images=[hf_image(data)], return_tensors="pt")
        ours = preprocess(data, pipe.preprocess_cfg)
        assert ours.grid_thw == tuple(ref["image_grid_thw"][0].tolist())
        assert torch.equal(ours.pixel_values, ref["pixel_values"])


def hf_image(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data))
