"""Build the decoder of a checkpoint and load its language half into it.

Vision-language checkpoints keep the decoder under `model.language_model.*`; plain text
checkpoints under `model.*`. `lm_head.weight` may be absent when embeddings are tied.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from common.config import ModelConfig
from common.weights import Checkpoint, load_module
from services.language.model import Attention, Experts, Qwen3MoeForCausalLM


def load_decoder(
    model_dir: str | Path,
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Qwen3MoeForCausalLM:
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(cfg.text)
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if cfg.tie_word_embeddings else None
    load_module(model, Checkpoint(model_dir), _renamer(cfg), dtype=dtype, device=device, tied=tied)
    for module in model.modules():
        if isinstance(module, Experts):
            module.use_kernel_layout()
        elif isinstance(module, Attention):
            module.fuse_qkv()
    return model.eval()


def _renamer(cfg: ModelConfig) -> Callable[[str], str | None]:
    prefix = cfg.text_prefix

    def rename(key: str) -> str | None:
        if key == "lm_head.weight":
            return key
        if key.startswith(prefix):
            return "model." + key[len(prefix) :]
        if key.startswith("model.visual."):
            return None  # the encoder's half
        return key  # reported as unexpected

    return rename
