"""Model configuration: frozen dataclasses built once from a Hugging Face `config.json`.

Three checkpoint families share one decoder:

- `qwen3_vl_moe`: vision tower + MoE decoder (`model.visual.*`, `model.language_model.*`).
- `qwen3_vl`: vision tower + dense decoder (same layout, dense MLPs).
- `qwen3_moe`: plain MoE text decoder (`model.*`), no vision tower.

Both the transformers 5.x field names (`rope_parameters`, `num_local_experts`) and the legacy
hub ones (`rope_theta` + `rope_scaling`, `num_experts`) are accepted. A missing required field
raises `ValueError` naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen3_vl_moe", "qwen3_vl", "qwen3_moe")

_MISSING = object()


def _get(d: dict[str, Any], *names: str, where: str, default: Any = _MISSING) -> Any:
    """First present key among `names` (aliases), else `default`, else a ValueError naming it."""
    for name in names:
        if name in d and d[name] is not None:
            return d[name]
    if default is _MISSING:
        raise ValueError(f"config.json: missing required field '{where}.{names[0]}'")
    return default


def _rope(d: dict[str, Any], where: str) -> tuple[float, tuple[int, ...] | None]:
    """(rope_theta, mrope_section) from `rope_parameters` (5.x) or `rope_theta`/`rope_scaling`."""
    params = d.get("rope_parameters") or {}
    legacy = d.get("rope_scaling") or {}
    rope_type = params.get("rope_type", legacy.get("rope_type", legacy.get("type", "default")))
    if rope_type not in ("default", "mrope"):
        raise ValueError(f"config.json: {where}.rope_type {rope_type!r} is not supported")
    theta = params.get("rope_theta", d.get("rope_theta"))
    if theta is None:
        raise ValueError(
            f"config.json: missing required field '{where}.rope_parameters.rope_theta'"
        )
    section = params.get("mrope_section", legacy.get("mrope_section"))
    return float(theta), (tuple(int(s) for s in section) if section else None)


@dataclass(frozen=True, slots=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_deepstack(self) -> int:
        """D: how many deepstack levels the decoder receives (3 for the released models)."""
        return len(self.deepstack_visual_indexes)

    @property
    def output_width(self) -> int:
        """Columns of one image's wire tensor: merged embedding plus D deepstack levels."""
        return (1 + self.num_deepstack) * self.out_hidden_size

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> VisionConfig:
        w = "vision_config"
        params = d.get("rope_parameters") or {}
        indexes = tuple(int(i) for i in _get(d, "deepstack_visual_indexes", where=w))
        if list(indexes) != sorted(indexes):
            raise ValueError(f"config.json: {w}.deepstack_visual_indexes must be sorted: {indexes}")
        cfg = cls(
            depth=int(_get(d, "depth", where=w)),
            hidden_size=int(_get(d, "hidden_size", where=w)),
            intermediate_size=int(_get(d, "intermediate_size", where=w)),
            num_heads=int(_get(d, "num_heads", where=w)),
            in_channels=int(_get(d, "in_channels", where=w, default=3)),
            patch_size=int(_get(d, "patch_size", where=w)),
            temporal_patch_size=int(_get(d, "temporal_patch_size", where=w, default=2)),
            spatial_merge_size=int(_get(d, "spatial_merge_size", where=w, default=2)),
            out_hidden_size=int(_get(d, "out_hidden_size", where=w)),
            num_position_embeddings=int(_get(d, "num_position_embeddings", where=w)),
            deepstack_visual_indexes=indexes,
            hidden_act=str(d.get("hidden_act", "gelu_pytorch_tanh")),
            rope_theta=float(params.get("rope_theta", 10000.0)),
        )
        if any(i >= cfg.depth or i < 0 for i in indexes):
            raise ValueError(f"config.json: {w}.deepstack_visual_indexes {indexes} out of range")
        return cfg


@dataclass(frozen=True, slots=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # None: plain 1-D RoPE (text checkpoints); else the interleaved M-RoPE split of head_dim/2.
    mrope_section: tuple[int, ...] | None
    max_position_embeddings: int
    intermediate_size: int  # dense MLP width (dense layers only)
    num_experts: int  # 0 for dense decoders
    num_experts_per_tok: int
    moe_intermediate_size: int
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    # Qwen3-VL-MoE always renormalises the top-k weights; plain Qwen3-MoE obeys the flag.
    norm_topk_prob: bool
    attention_bias: bool = False
    hidden_act: str = "silu"

    def is_moe_layer(self, layer: int) -> bool:
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_hf(cls, d: dict[str, Any], *, vl_moe: bool, where: str) -> TextConfig:
        if d.get("use_sliding_window"):
            raise ValueError(f"config.json: {where}.use_sliding_window is not supported")
        theta, section = _rope(d, where)
        hidden = int(_get(d, "hidden_size", where=where))
        heads = int(_get(d, "num_attention_heads", where=where))
        num_experts = int(_get(d, "num_local_experts", "num_experts", where=where, default=0))
        cfg = cls(
            vocab_size=int(_get(d, "vocab_size", where=where)),
            hidden_size=hidden,
            num_hidden_layers=int(_get(d, "num_hidden_layers", where=where)),
            num_attention_heads=heads,
            num_key_value_heads=int(_get(d, "num_key_value_heads", where=where, default=heads)),
            head_dim=int(_get(d, "head_dim", where=where, default=hidden // heads)),
            rms_norm_eps=float(_get(d, "rms_norm_eps", where=where, default=1e-6)),
            rope_theta=theta,
            mrope_section=section,
            max_position_embeddings=int(_get(d, "max_position_embeddings", where=where)),
            intermediate_size=int(_get(d, "intermediate_size", where=where, default=0)),
            num_experts=num_experts,
            num_experts_per_tok=int(
                _get(
                    d,
                    "num_experts_per_tok",
                    where=where,
                    default=0 if not num_experts else _MISSING,
                )
            ),
            moe_intermediate_size=int(
                _get(
                    d,
                    "moe_intermediate_size",
                    where=where,
                    default=0 if not num_experts else _MISSING,
                )
            ),
            decoder_sparse_step=int(_get(d, "decoder_sparse_step", where=where, default=1)),
            mlp_only_layers=tuple(int(i) for i in d.get("mlp_only_layers") or ()),
            norm_topk_prob=True if vl_moe else bool(d.get("norm_topk_prob", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            hidden_act=str(d.get("hidden_act", "silu")),
        )
        if cfg.hidden_act != "silu":
            raise ValueError(f"config.json: {where}.hidden_act {cfg.hidden_act!r} is not supported")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError(
                f"config.json: {where}.num_attention_heads must be a multiple of kv heads"
            )
        if section is not None and sum(section) != cfg.head_dim // 2:
            raise ValueError(f"config.json: {where} mrope_section {section} must sum to head_dim/2")
        if (
            any(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
            and not cfg.intermediate_size
        ):
            raise ValueError(f"config.json: missing required field '{where}.intermediate_size'")
        return cfg


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str
    text: TextConfig
    vision: VisionConfig | None
    tie_word_embeddings: bool
    image_token_id: int | None = None
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None

    @property
    def num_deepstack(self) -> int:
        return self.vision.num_deepstack if self.vision else 0

    @property
    def text_prefix(self) -> str:
        """Checkpoint key prefix of the decoder's body."""
        return "model.language_model." if self.is_multimodal else "model."

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json: model_type {model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if model_type == "qwen3_moe":
            text = TextConfig.from_hf(d, vl_moe=False, where="config")
            return cls(
                model_type=model_type,
                text=text,
                vision=None,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                eos_token_ids=_ids(d.get("eos_token_id")),
            )
        text_d = _get(d, "text_config", where="config")
        vision = VisionConfig.from_hf(_get(d, "vision_config", where="config"))
        text = TextConfig.from_hf(text_d, vl_moe=model_type == "qwen3_vl_moe", where="text_config")
        if model_type == "qwen3_vl_moe" and text.num_experts == 0:
            raise ValueError("config.json: missing required field 'text_config.num_experts'")
        if vision.out_hidden_size != text.hidden_size:
            raise ValueError(
                f"config.json: vision_config.out_hidden_size ({vision.out_hidden_size}) must equal "
                f"text_config.hidden_size ({text.hidden_size})"
            )
        if text.mrope_section is None:
            raise ValueError("config.json: missing required field 'text_config.mrope_section'")
        return cls(
            model_type=model_type,
            text=text,
            vision=vision,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            image_token_id=int(_get(d, "image_token_id", where="config", default=151655)),
            video_token_id=int(_get(d, "video_token_id", where="config", default=151656)),
            vision_start_token_id=int(
                _get(d, "vision_start_token_id", where="config", default=151652)
            ),
            vision_end_token_id=int(_get(d, "vision_end_token_id", where="config", default=151653)),
            eos_token_ids=_ids(text_d.get("eos_token_id", d.get("eos_token_id"))),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"{model_dir}: no config.json (is this a model directory?)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_hf(data)


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
