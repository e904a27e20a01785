"""`epd make-tiny-model`: a random-weight checkpoint in the real Hugging Face format, offline.

The model is built and saved by transformers' own classes (so it is a genuine checkpoint that
transformers loads), with a byte-level BPE tokenizer trained here on a built-in text and the Qwen
special tokens and Qwen3's non-special markup tokens (`<tool_call>`, `<think>`, ...), the Qwen3-VL
chat template (tools, tool calls and tool responses as Qwen3-VL renders them, and Qwen3's
`enable_thinking` switch), a generation config and the image-processor config.
The same seed gives the same bytes.

Made to be served by other engines too (vLLM loads these without conversion):
 * the tokenizer names every id of the model's vocabulary: BPE training on the small corpus gives
   only a few hundred tokens (444 for `small`'s 4096 ids), so a random model would mostly emit ids
   that decode to "" and a streaming client would see no text for them. The missing ids get
   decode-only entries " t<id>" (no merge produces them, so prompts tokenize as before). The 128
   single-byte tokens of non-ASCII bytes remain: alone they are an incomplete UTF-8 character,
   which a streaming server holds back until the next token completes the chunk;
 * the text config carries `"norm_topk_prob": true` (transformers 5.x no longer writes it because
   Qwen3-VL-MoE always renormalises; vLLM reads it);
 * `expert_layout="hub"` stores the fused experts as the hub's 4.57-era checkpoints do,
   `gate_up_proj [E, H, 2I]` / `down_proj [E, I, H]` (vLLM 0.32 only loads that layout), instead
   of transformers 5.x's `[E, 2I, H]` / `[E, H, I]`. transformers and epd load either, by shape.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import TextConfig

log = logging.getLogger(__name__)

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
# Qwen3's added tokens that are not special: they stay in the decoded text, where the gateway's
# tool-call and reasoning parsers find them.
MARKUP_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>",
                 "</think>"]  # fmt: skip
# Qwen2's pre-tokenizer split (the regex of the real tokenizer.json).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CORPUS = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Describe this image. What is in the picture? There is a cat sitting on a red chair.
The sky is blue and the grass is green. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.
Vision language models read images and text together and answer questions about them.
Encoder and language services exchange image embeddings over the network.
"""


@dataclass(frozen=True)
class Preset:
    vocab_size: int
    bpe_vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mrope_section: tuple[int, int, int]
    experts: int
    top_k: int
    moe_intermediate: int
    intermediate: int
    vision_depth: int
    vision_hidden: int
    vision_heads: int
    vision_ffn: int
    pos_embeddings: int
    deepstack: tuple[int, ...]
    min_pixels: int
    max_pixels: int


# 2I != H and I != H in both presets, so the two fused-expert layouts are distinguishable.
PRESETS = {
    "tiny": Preset(
        vocab_size=512, bpe_vocab=400, hidden=64, layers=4, heads=4, kv_heads=2, head_dim=16,
        mrope_section=(2, 3, 3), experts=4, top_k=2, moe_intermediate=24, intermediate=96,
        vision_depth=4, vision_hidden=32, vision_heads=2, vision_ffn=48, pos_embeddings=64,
        deepstack=(1, 2, 3), min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 64,
    ),
    "small": Preset(
        vocab_size=4096, bpe_vocab=1000, hidden=512, layers=8, heads=8, kv_heads=2, head_dim=64,
        mrope_section=(12, 10, 10), experts=16, top_k=4, moe_intermediate=384, intermediate=1536,
        vision_depth=8, vision_hidden=256, vision_heads=4, vision_ffn=1024, pos_embeddings=2304,
        deepstack=(2, 4, 6), min_pixels=64 * 64, max_pixels=1024 * 1024,
    ),
    # Qwen3-VL-30B-A3B's decoder layer shapes and vocabulary, 4 of its 48 layers, a small vision
    # tower: GPU decode benchmarks (`epd bench-engine --device cuda` builds it in memory).
    "a3b-4layer": Preset(
        vocab_size=151936, bpe_vocab=400, hidden=2048, layers=4, heads=32, kv_heads=4,
        head_dim=128, mrope_section=(24, 20, 20), experts=128, top_k=8, moe_intermediate=768,
        intermediate=6144, vision_depth=3, vision_hidden=64, vision_heads=2, vision_ffn=128,
        pos_embeddings=2304, deepstack=(0, 1, 2), min_pixels=32 * 32 * 4,
        max_pixels=32 * 32 * 64,
    ),
}  # fmt: skip
ARCHS = ("qwen3_vl_moe", "qwen3_vl", "qwen3_moe")
EXPERT_LAYOUTS = ("transformers", "hub")
_FUSED_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def make_tiny_model(
    out_dir: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    arch: str = "qwen3_vl_moe",
    deepstack: tuple[int, ...] | None = None,
    expert_layout: str = "transformers",
) -> Path:
    """Write the checkpoint to `out_dir` (created) and return its path. `expert_layout`:
    "transformers" (5.x, `[E, 2I, H]` / `[E, H, I]`) or "hub" (`[E, H, 2I]` / `[E, I, H]`); the
    same seed gives the same weights in either."""
    import torch

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r} (choose from {', '.join(ARCHS)})")
    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(
            f"unknown expert layout {expert_layout!r} (choose from {', '.join(EXPERT_LAYOUTS)})"
        )
    if expert_layout == "hub" and arch != "qwen3_vl_moe":
        # Plain Qwen3-MoE hub checkpoints store one tensor per expert, not a transposed fusion.
        raise ValueError("expert_layout='hub' is the qwen3_vl_moe hub layout; use that arch")
    p = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _write_tokenizer(out, p)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    torch.manual_seed(seed)
    model = _build_model(arch, p, ids, deepstack)
    model.save_pretrained(out)
    if expert_layout == "hub":
        _to_hub_expert_layout(out)
    _apply_umask(out.glob("*.safetensors"))
    _write_generation_config(out, ids)
    if arch != "qwen3_moe":
        _write_image_processor(out, p)
        _write_video_processor(out, p)
    log.info("wrote %s checkpoint (%s preset, seed %d) to %s", arch, preset, seed, out)
    return out


def _apply_umask(paths: Iterable[Path]) -> None:
    """safetensors writes its files 0600 whatever the umask; give them the mode every other file
    of the checkpoint gets, so a container running as another user (the image's uid 10001) can
    read a checkpoint made here."""
    mask = os.umask(0)
    os.umask(mask)
    for path in paths:
        path.chmod(0o666 & ~mask)


def preset_text_config(preset: str) -> TextConfig:
    """The decoder config a preset's `qwen3_vl_moe` checkpoint has, without writing one (the
    tokenizer gives the special tokens ids 0..13 in `SPECIAL_TOKENS` order)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    text = _text_config(PRESETS[preset], ids, moe=True)
    text["rope_parameters"] = _mrope_parameters(PRESETS[preset])
    return TextConfig.from_hf(text, vl_moe=True, where="text_config")


def _mrope_parameters(p: Preset) -> dict[str, Any]:
    return {
        "rope_type": "default", "rope_theta": 5e6,
        "mrope_section": list(p.mrope_section), "mrope_interleaved": True,
    }  # fmt: skip


def _text_config(p: Preset, ids: dict[str, int], moe: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(
        vocab_size=p.vocab_size, hidden_size=p.hidden, num_hidden_layers=p.layers,
        num_attention_heads=p.heads, num_key_value_heads=p.kv_heads, head_dim=p.head_dim,
        intermediate_size=p.intermediate, max_position_embeddings=8192, rms_norm_eps=1e-6,
        bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )  # fmt: skip
    if moe:
        # norm_topk_prob: Qwen3-VL-MoE always renormalises (transformers 5.x ignores the field);
        # written as the hub's configs have it, for engines that read it.
        cfg.update(
            num_experts=p.experts, num_experts_per_tok=p.top_k,
            moe_intermediate_size=p.moe_intermediate, decoder_sparse_step=1, mlp_only_layers=[],
            norm_topk_prob=True,
        )  # fmt: skip
    return cfg


def _build_model(
    arch: str, p: Preset, ids: dict[str, int], deepstack: tuple[int, ...] | None
) -> Any:
    import transformers as tf

    if arch == "qwen3_moe":
        text = _text_config(p, ids, moe=True)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
        cfg = tf.Qwen3MoeConfig(**text, tie_word_embeddings=False)
        return tf.Qwen3MoeForCausalLM(cfg).eval()
    text = _text_config(p, ids, moe=arch == "qwen3_vl_moe")
    text["rope_parameters"] = _mrope_parameters(p)
    ds = list(deepstack if deepstack is not None else p.deepstack)
    vision = dict(
        depth=p.vision_depth, hidden_size=p.vision_hidden, num_heads=p.vision_heads,
        intermediate_size=p.vision_ffn, patch_size=16, temporal_patch_size=2,
        spatial_merge_size=2, in_channels=3, out_hidden_size=p.hidden,
        num_position_embeddings=p.pos_embeddings, deepstack_visual_indexes=ds,
    )  # fmt: skip
    common: dict[str, Any] = dict(
        text_config=text, vision_config=vision, tie_word_embeddings=False,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    if arch == "qwen3_vl_moe":
        return tf.Qwen3VLMoeForConditionalGeneration(tf.Qwen3VLMoeConfig(**common)).eval()
    return tf.Qwen3VLForConditionalGeneration(tf.Qwen3VLConfig(**common)).eval()


def _write_tokenizer(out: Path, p: Preset) -> Any:
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import Qwen2TokenizerFast  # type: ignore[attr-defined]

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=p.bpe_vocab,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    tok = _name_every_id(tok, p.vocab_size)
    template = (Path(__file__).parent / "chat_template.jinja").read_text()
    wrapped = Qwen2TokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=template,
        model_max_length=8192,
    )
    wrapped.save_pretrained(out)
    return wrapped


def _name_every_id(tok: Any, vocab_size: int) -> Any:
    """The trained tokenizer plus a decode-only vocab entry " t<id>" for every id in
    [0, vocab_size) it does not name. No merge rule produces these (the pre-tokenizer also splits
    digits one by one), so encoding is unchanged; decoding any id the model emits gives text."""
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for t in spec["added_tokens"]:  # non-special added tokens (markup) in the vocab, as Qwen's
        if not t["special"]:  # (else transformers gives them new ids past the vocabulary)
            vocab[t["content"]] = t["id"]
    named = set(vocab.values()) | {t["id"] for t in spec["added_tokens"]}
    for i in range(vocab_size):
        if i not in named:
            vocab[f"\u0120t{i}"] = i  # byte-level "Ġ" is the space byte
    return Tokenizer.from_str(json.dumps(spec))


def _to_hub_expert_layout(out: Path) -> None:
    """Rewrite `model.safetensors` with each layer's fused experts transposed to the hub layout:
    gate_up_proj `[E, 2I, H]` -> `[E, H, 2I]`, down_proj `[E, H, I]` -> `[E, I, H]`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = out / "model.safetensors"
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    for key, t in tensors.items():
        if key.endswith(_FUSED_EXPERTS):
            tensors[key] = t.transpose(1, 2).contiguous()
    save_file(tensors, path, metadata=metadata)


def _write_generation_config(out: Path, ids: dict[str, int]) -> None:
    gen = {
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "do_sample": False,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _write_image_processor(out: Path, p: Preset) -> None:
    from transformers import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": p.min_pixels, "longest_edge": p.max_pixels},
    )
    proc.save_pretrained(out)


def _write_video_processor(out: Path, p: Preset) -> None:
    """`video_preprocessor_config.json` as the hub's Qwen3-VL checkpoints ship it (plain JSON:
    the class needs torchvision to be imported). The pixel budget counts all sampled frames, so
    it is the image budget times 4 here (the tiny one keeps test videos small)."""
    cfg = {
        "video_processor_type": "Qwen3VLVideoProcessor",
        "processor_class": "Qwen3VLProcessor",
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "size": {"shortest_edge": p.min_pixels, "longest_edge": 4 * p.max_pixels},
        "fps": 2,
        "min_frames": 4,
        "max_frames": 768,
        "do_sample_frames": True,
        "cap_pixels_per_frame": False,
    }
    (out / "video_preprocessor_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="output directory (created)")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="tiny",
        help="tiny: ~1.5 MB, for tests; small: a few hundred MB, for CPU benchmarks; "
        "a3b-4layer: Qwen3-VL-30B-A3B decoder shapes, 4 layers, ~12 GB, for GPU benchmarks",
    )
    parser.add_argument("--seed", type=int, default=0, help="torch seed for the random weights")
    parser.add_argument(
        "--arch",
        choices=ARCHS,
        default="qwen3_vl_moe",
        help="checkpoint family (default: %(default)s)",
    )
    parser.add_argument(
        "--deepstack",
        default=None,
        help="comma-separated vision block indexes for deepstack (preset default)",
    )
    parser.add_argument(
        "--expert-layout",
        choices=EXPERT_LAYOUTS,
        default="transformers",
        help="fused-expert tensors as transformers 5.x saves them ([E, 2I, H] / [E, H, I]) or as "
        "the hub's checkpoints store them ([E, H, 2I] / [E, I, H]; what vLLM 0.32 loads). "
        "transformers and epd load either; default: %(default)s",
    )
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty directory")


def run(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise SystemExit(f"epd make-tiny-model: {out} is not empty (use --force to overwrite)")
    deepstack = tuple(int(i) for i in args.deepstack.split(",")) if args.deepstack else None
    make_tiny_model(
        out, preset=args.preset, seed=args.seed, arch=args.arch, deepstack=deepstack,
        expert_layout=args.expert_layout,
    )  # fmt: skip
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {args.arch} ({args.preset}) checkpoint to {out} ({size / 2**20:.1f} MiB)")
    return 0
