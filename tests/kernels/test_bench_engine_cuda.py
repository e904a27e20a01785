"""The CPU-side parts of `epd bench-engine --device cuda`: the A3B preset's shapes, the bandwidth
floor, the step-time estimate, the measurement loop on a tiny decoder, and clear exits."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from bench import engine_cuda
from bench.engine_cuda import (
    DecodeRow,
    decode_bytes,
    expected_experts_hit,
    format_table,
    random_decoder,
    step_seconds,
)
from common.config import ModelConfig
from services.cli import main
from services.language.engine.model_runner import ModelRunner
from services.tiny_model import PRESETS, preset_text_config


def test_a3b_preset_has_the_real_decoder_layer_shapes() -> None:
    t = preset_text_config("a3b-4layer")
    assert (t.hidden_size, t.num_hidden_layers, t.vocab_size) == (2048, 4, 151936)
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (32, 4, 128)
    assert (t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size) == (128, 8, 768)
    assert t.mrope_section == (24, 20, 20) and t.norm_topk_prob
    assert all(t.is_moe_layer(i) for i in range(4))
    assert PRESETS["a3b-4layer"].deepstack == (0, 1, 2)  # fewer levels than decoder layers
    with pytest.raises(ValueError, match="unknown preset"):
        preset_text_config("a3b")


def test_experts_hit_expectation() -> None:
    assert expected_experts_hit(128, 8, 1) == pytest.approx(8)  # one token: exactly its top-k
    assert expected_experts_hit(128, 8, 8) == pytest.approx(128 * (1 - (120 / 128) ** 8))
    assert 125 < expected_experts_hit(128, 8, 64) < 128


def test_decode_bytes_at_a3b_shapes() -> None:
    t = preset_text_config("a3b-4layer")
    h, elem, ctx = 2048, 2, 100.0
    attention = 2 * h * 4096 + 2 * h * 512 + 2 * h + 2 * 128
    layer = attention + 128 * h + 8 * 3 * h * 768  # batch 1: 8 experts
    kv = 1 * ctx * 2 * 4 * 128
    expected = (4 * (layer + kv) + h + 151936 * h + h) * elem
    assert decode_bytes(t, 1, ctx, elem) == pytest.approx(expected)
    # ~1.07 GB at batch 1 (lm_head alone is 0.62 GB); more experts at batch 64.
    assert 1.0e9 < decode_bytes(t, 1, ctx, elem) < 1.2e9
    assert decode_bytes(t, 64, ctx, elem) > 4 * 120 * 3 * h * 768 * elem


def test_step_seconds_is_the_middle_median() -> None:
    # Prefill gap first (1 s), then 10 ms steps, a slow straggler step at the end.
    stamps = [[0.0, 1.0, *(1.0 + 0.01 * i for i in range(1, 14)), 9.0] for _ in range(3)]
    assert step_seconds(stamps) == pytest.approx(0.01)


def test_table_lists_every_row() -> None:
    rows = [DecodeRow(1, True, 0.5, 2000.0, 8.0, 1070.0, 2140.0, 0.64),
            DecodeRow(64, False, 3.0, 21333.0, 125.9, 5000.0, 1666.0, 0.5)]  # fmt: skip
    table = format_table(rows, "NVIDIA H100")
    assert table.count("\n") == 4 and " 64.0" in table and "yes" in table and " no" in table


def test_measurement_loop_on_a_tiny_random_decoder() -> None:
    """The same loop the GPU run uses, on the CPU with the tiny preset: every request yields its
    tokens, and the row's arithmetic is consistent."""
    text = preset_text_config("tiny")
    model = random_decoder(text, torch.float32, "cpu", seed=1)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model.model.norm.weight, torch.ones(text.hidden_size))
    cfg = ModelConfig("qwen3_vl_moe", text, None, tie_word_embeddings=False)
    runner = ModelRunner(cfg, model, 1 << 20, block_size=4)
    stamps = asyncio.run(engine_cuda._decode(runner, cfg, 3, 9, 8, seed=0))
    assert [len(s) for s in stamps] == [8, 8, 8]
    assert all(s == sorted(s) for s in stamps)
    step = step_seconds(stamps)
    assert step > 0 and math.isfinite(step)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_run_without_gpu_exits_2(capsys) -> None:
    assert main(["bench-engine", "--device", "cuda"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_cpu_run_still_needs_a_model() -> None:
    with pytest.raises(SystemExit, match="--model is required"):
        main(["bench-engine", "--device", "cpu"])
