"""`epd generate` as a user runs it, on a checkpoint written by transformers outside this
project."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import transformers as tf

EPD = str(Path(sys.executable).parent / "epd")


def build_foreign_checkpoint(out: Path, tokenizer_from: Path) -> Path:
    """A Qwen3-VL-MoE checkpoint of a shape none of our presets use, saved by transformers."""
    ids = json.loads((tokenizer_from / "config.json").read_text())
    cfg = tf.Qwen3VLMoeConfig(
        text_config={
            "vocab_size": 512, "hidden_size": 48, "num_hidden_layers": 3,
            "num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 8,
            "num_experts": 6, "num_experts_per_tok": 3, "moe_intermediate_size": 20,
            "intermediate_size": 64, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                "mrope_section": [2, 1, 1], "mrope_interleaved": True},
        },
        vision_config={
            "depth": 3, "hidden_size": 24, "num_heads": 3, "intermediate_size": 40,
            "out_hidden_size": 48, "num_position_embeddings": 36,
            "deepstack_visual_indexes": [0, 1],
        },
        image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
    )  # fmt: skip
    torch.manual_seed(1234)
    tf.Qwen3VLMoeForConditionalGeneration(cfg).save_pretrained(out)
    for name in [
        "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
        "preprocessor_config.json", "generation_config.json",
    ]:  # fmt: skip
        shutil.copy(tokenizer_from / name, out / name)
    return out


def test_epd_generate_matches_transformers_greedy(tiny_model, tmp_path, png, oracle):
    model = build_foreign_checkpoint(tmp_path / "foreign", tiny_model)
    images = [tmp_path / "a.png", tmp_path / "b.png"]
    images[0].write_bytes(png(180, 120, 11))
    images[1].write_bytes(png(64, 130, 12))
    prompt = "What do these two pictures show?"
    cmd = [EPD, "generate", "--model", str(model), "--prompt", prompt, "--max-tokens", "12"]
    for p in images:
        cmd += ["--image", str(p)]
    proc = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    hf = oracle(model)
    expected = hf.generate(hf.inputs([p.read_bytes() for p in images], prompt), 12)
    assert result["token_ids"] == expected
    eos = set(hf.model.generation_config.eos_token_id)
    text = hf.tokenizer.decode([t for t in expected if t not in eos], skip_special_tokens=True)
    assert result["text"] == text


def test_epd_generate_reports_bad_input_without_a_traceback(tiny_model, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    proc = subprocess.run(
        [EPD, "generate", "--model", str(tiny_model), "--image", str(bad), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "cannot decode image" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [EPD, "generate", "--model", str(tmp_path), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "no config.json" in proc.stderr


def test_bench_generate_reports_both_systems(tiny_model):
    proc = subprocess.run(
        [EPD, "bench-generate", "--model", str(tiny_model), "--repeats", "1",
         "--output-tokens", "4", "--image-size", "96x64", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report["systems"]) == {"epd", "transformers"}
    for system in report["systems"].values():
        assert system["prefill_tok_s"] > 0 and system["decode_tok_s"] > 0
    assert report["prompt_tokens"] > 0 and report["ratio_decode"] > 0
