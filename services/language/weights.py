"""Build the decoder of a checkpoint and load its language half into it.

Vision-language checkpoints keep the decoder under `model.language_model.*`; plain text
checkpoints under `model.*`. `lm_head.weight` may be absent when embeddings are tied. A
tensor-parallel rank builds its own part of the decoder (`parallel.layers.shard_decoder`) and
reads only that part of each tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from common.config import ModelConfig
from common.packed_linear import pack_linears
from common.weights import Checkpoint, load_module
from services.language.model import Attention, Experts, Qwen3MoeForCausalLM

if TYPE_CHECKING:
    from services.language.parallel.layers import ParallelDecoder


def load_decoder(
    model_dir: str | Path,
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    parallel: ParallelDecoder | None = None,
    kernel_layout: bool = True,
) -> Qwen3MoeForCausalLM:
    """The whole decoder, or with `parallel` this rank's part of it. `kernel_layout`: weights
    re-stored as the device's kernels read them (experts packed, q/k/v fused into one layer, on
    CPU linear layers packed for oneDNN); False keeps the checkpoint's tensors as loaded."""
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(cfg.text)
    vocab = True
    if parallel is not None:
        from services.language.parallel.layers import shard_decoder

        shard_decoder(model, cfg.text, parallel)
        vocab = parallel.holds_vocab
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if cfg.tie_word_embeddings else None
    load_module(
        model, Checkpoint(model_dir), _renamer(cfg, vocab), dtype=dtype, device=device,
        tied=tied if vocab else None, shard=parallel.plan.shard if parallel else None,
    )  # fmt: skip
    if not kernel_layout:
        return model.eval()
    for module in model.modules():
        if isinstance(module, Experts):
            module.use_kernel_layout()
        elif isinstance(module, Attention):
            module.fuse_qkv()
    pack_linears(model)  # CPU: oneDNN's layout (common/packed_linear.py)
    return model.eval()


def _renamer(cfg: ModelConfig, vocab: bool = True) -> Callable[[str], str | None]:
    """Checkpoint key -> module key; `vocab=False` leaves out the embeddings and lm_head."""
    prefix = cfg.text_prefix

    def rename(key: str) -> str | None:
        if key == "lm_head.weight":
            return key if vocab else None
        if key.startswith(prefix):
            name = "model." + key[len(prefix) :]
            return None if not vocab and name.startswith("model.embed_tokens.") else name
        if key.startswith("model.visual."):
            return None  # the encoder's half
        return key  # reported as unexpected

    return rename
