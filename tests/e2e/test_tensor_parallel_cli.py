"""`epd generate` and `epd up` with `--tensor-parallel-size`, as users run them: transformers'
greedy tokens with images (deepstack on), and no worker process left once they exit."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import openai
import pytest

from services.language.parallel.config import ParallelConfig
from services.up import StackConfig, running_stack
from tests.e2e.serving import EPD
from tests.e2e.test_stack import expected_text, image_messages


def worker_pids(log: str) -> list[int]:
    """From rank 0's log line "... spawned ranks 1..N-1 (pids [...])"."""
    line = next(x for x in log.splitlines() if "spawned ranks" in x)
    pids: list[int] = json.loads(line.split("pids ")[1].strip().rstrip(")"))
    return pids


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize(
    ("flags", "with_image"),
    [
        (("-tp", "2", "--enable-expert-parallel"), True),
        (("-tp", "2"), False),
        (("-tp", "4"), True),  # 4 ranks, 2 KV heads: each KV head on two ranks
    ],
    ids=["tp2-ep-image", "tp2-text", "tp4-image"],
)
def test_epd_generate_matches_transformers(tiny_model, tmp_path, png, oracle, flags, with_image):
    image = tmp_path / "a.png"
    image.write_bytes(png(150, 100, 7))
    prompt = "What is in this picture?" if with_image else "Tell me about the sea."
    argv = [EPD, "generate", "--model", str(tiny_model), "--prompt", prompt, "--max-tokens",
            "12", "--json", *flags, *(("--image", str(image)) if with_image else ())]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    hf = oracle(tiny_model)
    raw = [image.read_bytes()] if with_image else []
    assert json.loads(proc.stdout)["token_ids"] == hf.generate(hf.inputs(raw, prompt), 12)
    assert "rank 1: weights" in proc.stderr  # per-rank memory, reported at start-up
    assert all(gone(pid) for pid in worker_pids(proc.stderr))


@pytest.mark.parametrize(
    "parallel",
    [
        ParallelConfig(tensor_parallel_size=2),
        ParallelConfig(tensor_parallel_size=2, enable_expert_parallel=True),
        ParallelConfig(tensor_parallel_size=4),
    ],
    ids=["tp2", "tp2-ep", "tp4"],
)
def test_epd_up_serves_transformers_greedy_text_over_ranks(tiny_model, oracle, png, parallel):
    cfg = StackConfig(model=str(tiny_model), http_port=0, kv_cache_bytes=16 << 20,
                      parallel=parallel)  # fmt: skip
    images = [png(120, 90, 3)]
    want = expected_text(oracle, tiny_model, images, "What is in this picture?", 12)
    text_only = image_messages([], "Tell me about the sea.")
    want_text = expected_text(oracle, tiny_model, [], "Tell me about the sea.", 12)
    with running_stack(cfg, timeout=180) as stack:
        c = openai.OpenAI(base_url=stack.base_url, api_key="x", max_retries=0, timeout=60)
        name = c.models.list().data[0].id
        reply = c.chat.completions.create(model=name, messages=image_messages(images),
                                          max_tokens=12, temperature=0)  # fmt: skip
        assert reply.choices[0].message.content == want
        reply = c.chat.completions.create(model=name, messages=text_only, max_tokens=12,
                                          temperature=0)  # fmt: skip
        assert reply.choices[0].message.content == want_text
        language = stack.role("language")[0]
        pids = worker_pids(language.log_path.read_text())
    want_workers = parallel.tensor_parallel_size - 1
    assert len(pids) == want_workers and all(gone(pid) for pid in pids)  # stopped with it
