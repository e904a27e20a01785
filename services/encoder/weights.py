"""Build the vision tower of a checkpoint and load `model.visual.*` into it."""

from __future__ import annotations

from pathlib import Path

import torch

from common.config import ModelConfig
from common.packed_linear import pack_linears
from common.weights import Checkpoint, load_module
from services.encoder.model import VisionTower

PREFIX = "model.visual."


def load_vision_tower(
    model_dir: str | Path,
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> VisionTower:
    if cfg.vision is None:
        raise ValueError(f"{model_dir}: {cfg.model_type} checkpoint has no vision tower")
    with torch.device("meta"):
        tower = VisionTower(cfg.vision)
    load_module(
        tower,
        Checkpoint(model_dir),
        _rename,
        dtype=dtype,
        device=device,
    )
    pack_linears(tower)  # CPU: oneDNN's layout (common/packed_linear.py)
    tower.patch_embed.pack()
    return tower.eval()


def _rename(key: str) -> str | None:
    if key.startswith(PREFIX):
        return key[len(PREFIX) :]
    if key.startswith(("model.language_model.", "lm_head.")):
        return None  # the language service's half
    return key  # reported as unexpected
