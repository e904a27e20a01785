"""Checkpoint loading errors: missing files, missing or unexpected keys, wrong shapes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.config import ModelConfig
from services.encoder.weights import load_vision_tower
from services.language.weights import load_decoder


def copy_model(src, dst, edit=None):
    shutil.copytree(src, dst)
    if edit is not None:
        tensors = load_file(src / "model.safetensors")
        edit(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_weights_file(tiny_model, tmp_path):
    broken = copy_model(tiny_model, tmp_path / "m")
    (broken / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors or model.safetensors.index.json"):
        load_decoder(broken, ModelConfig.from_dir(broken))


def test_missing_shard_listed_in_index(tiny_model, tmp_path):
    broken = copy_model(tiny_model, tmp_path / "m")
    (broken / "model.safetensors").rename(broken / "model-00001-of-00002.safetensors")
    keys = load_file(broken / "model-00001-of-00002.safetensors").keys()
    index = {k: "model-00001-of-00002.safetensors" for k in keys}
    index["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        load_decoder(broken, ModelConfig.from_dir(broken))


def test_missing_and_unexpected_keys_are_listed(tiny_model, tmp_path):
    def edit(t):
        del t["model.language_model.layers.1.self_attn.q_norm.weight"]
        del t["model.visual.blocks.0.norm1.bias"]
        t["model.language_model.layers.9.mlp.gate.weight"] = torch.zeros(4, 64)

    broken = copy_model(tiny_model, tmp_path / "m", edit)
    cfg = ModelConfig.from_dir(broken)
    with pytest.raises(ValueError) as err:
        load_decoder(broken, cfg)
    msg = str(err.value)
    assert "missing keys (1): model.layers.1.self_attn.q_norm.weight" in msg
    assert "unexpected keys (1): model.language_model.layers.9.mlp.gate.weight" in msg
    with pytest.raises(ValueError, match=r"missing keys \(1\): blocks.0.norm1.bias"):
        load_vision_tower(broken, cfg)


def test_wrong_shape_names_the_tensor(tiny_model, tmp_path):
    def edit(t):
        t["lm_head.weight"] = torch.zeros(512, 32)

    broken = copy_model(tiny_model, tmp_path / "m", edit)
    with pytest.raises(
        ValueError, match=r"lm_head.weight has shape \(512, 32\), expected \(512, 64\)"
    ):
        load_decoder(broken, ModelConfig.from_dir(broken))


def test_tied_embeddings_need_no_lm_head(tiny_text_moe, tmp_path):
    def edit(t):
        del t["lm_head.weight"]

    tied = copy_model(tiny_text_moe, tmp_path / "m", edit)
    cfg_path = tied / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tie_word_embeddings"] = True
    cfg_path.write_text(json.dumps(cfg))
    model = load_decoder(tied, ModelConfig.from_dir(tied))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_fp32_weights_are_not_copied(tiny_model):
    """fp32 -> fp32 on CPU keeps the safetensors mmap (no second copy of the weights)."""
    model = load_decoder(tiny_model, ModelConfig.from_dir(tiny_model))
    w = model.model.embed_tokens.weight
    assert not w.untyped_storage().resizable()  # an mmapped storage, not an allocation
