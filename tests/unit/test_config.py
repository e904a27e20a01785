"""ModelConfig from config.json: both field spellings, clear errors."""

from __future__ import annotations

import copy
import json

import pytest

from common.config import ModelConfig

# Real Qwen3-VL-30B-A3B-Instruct config.json (hub, transformers 4.57 era), trimmed of unused keys.
HUB_30B = {
    "architectures": ["Qwen3VLMoeForConditionalGeneration"],
    "image_token_id": 151655,
    "model_type": "qwen3_vl_moe",
    "text_config": {
        "decoder_sparse_step": 1,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "max_position_embeddings": 262144,
        "mlp_only_layers": [],
        "model_type": "qwen3_vl_moe_text",
        "moe_intermediate_size": 768,
        "norm_topk_prob": True,
        "num_attention_heads": 32,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 48,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "mrope_interleaved": True,
            "mrope_section": [24, 20, 20],
            "rope_type": "default",
        },
        "rope_theta": 5000000,
        "vocab_size": 151936,
    },
    "tie_word_embeddings": False,
    "video_token_id": 151656,
    "vision_config": {
        "deepstack_visual_indexes": [8, 16, 24],
        "depth": 27,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "in_channels": 3,
        "intermediate_size": 4304,
        "model_type": "qwen3_vl_moe",
        "num_heads": 16,
        "num_position_embeddings": 2304,
        "out_hidden_size": 2048,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "vision_end_token_id": 151653,
    "vision_start_token_id": 151652,
}


def test_legacy_hub_config_of_the_30b_model_loads():
    cfg = ModelConfig.from_hf(HUB_30B)
    assert cfg.text.num_experts == 128 and cfg.text.num_experts_per_tok == 8
    assert cfg.text.rope_theta == 5e6 and cfg.text.mrope_section == (24, 20, 20)
    assert cfg.vision is not None and cfg.vision.deepstack_visual_indexes == (8, 16, 24)
    assert cfg.num_deepstack == 3 and cfg.vision.output_width == 4 * 2048
    assert cfg.text_prefix == "model.language_model."
    assert all(cfg.text.is_moe_layer(i) for i in range(48))
    assert cfg.text.norm_topk_prob  # Qwen3-VL-MoE always renormalises


def test_transformers_5_config_matches_its_legacy_spelling(tiny_model):
    saved = json.loads((tiny_model / "config.json").read_text())
    legacy = copy.deepcopy(saved)
    text = legacy["text_config"]
    text["num_experts"] = text.pop("num_local_experts")
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = rope
    assert ModelConfig.from_hf(saved) == ModelConfig.from_hf(legacy)


def test_plain_text_moe_config_obeys_norm_topk_prob():
    d = copy.deepcopy(HUB_30B["text_config"])
    d.update(model_type="qwen3_moe", norm_topk_prob=False)
    d.pop("rope_scaling")
    cfg = ModelConfig.from_hf(d)
    assert cfg.vision is None and cfg.text_prefix == "model." and not cfg.text.norm_topk_prob
    assert cfg.text.mrope_section is None


def test_unsupported_model_type_is_named():
    with pytest.raises(ValueError, match=r"model_type 'llama' is not supported"):
        ModelConfig.from_hf({"model_type": "llama"})


@pytest.mark.parametrize(
    ("section", "field", "expected"),
    [
        ("text_config", "hidden_size", "text_config.hidden_size"),
        ("text_config", "num_experts", "text_config.num_experts"),
        ("text_config", "rope_theta", "text_config.rope_parameters.rope_theta"),
        ("vision_config", "depth", "vision_config.depth"),
        ("vision_config", "deepstack_visual_indexes", "vision_config.deepstack_visual_indexes"),
    ],
)
def test_missing_field_is_named(section, field, expected):
    d = copy.deepcopy(HUB_30B)
    d[section].pop(field)
    with pytest.raises(ValueError, match=f"missing required field '{expected}'"):
        ModelConfig.from_hf(d)


def test_mismatched_vision_output_width_is_rejected():
    d = copy.deepcopy(HUB_30B)
    d["vision_config"]["out_hidden_size"] = 4096
    with pytest.raises(ValueError, match="out_hidden_size"):
        ModelConfig.from_hf(d)


def test_missing_config_file_and_bad_json(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_dir(tmp_path)
