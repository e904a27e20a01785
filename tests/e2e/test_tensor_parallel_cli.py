"""`epd generate` and `epd up` with `--tensor-parallel-size`, as users run them: transformers'
greedy tokens with images (deepstack on), and no worker process left once they exit."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import openai

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


def test_epd_generate_with_expert_parallel_matches_transformers(tiny_model, tmp_path, png,
                                                                oracle):  # fmt: skip
    image = tmp_path / "a.png"
    image.write_bytes(png(150, 100, 7))
    prompt = "What is in this picture?"
    proc = subprocess.run(
        [EPD, "generate", "--model", str(tiny_model), "--image", str(image), "--prompt", prompt,
         "--max-tokens", "12", "--json", "-tp", "2", "--enable-expert-parallel"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    hf = oracle(tiny_model)
    assert json.loads(proc.stdout)["token_ids"] == hf.generate(hf.inputs([image.read_bytes()],
                                                                           prompt), 12)  # fmt: skip
    assert "rank 1: weights" in proc.stderr  # per-rank memory, reported at start-up
    assert all(gone(pid) for pid in worker_pids(proc.stderr))


def test_epd_up_serves_transformers_greedy_text_over_two_ranks(tiny_model, oracle, png):
    cfg = StackConfig(model=str(tiny_model), http_port=0, kv_cache_bytes=16 << 20,
                      parallel=ParallelConfig(tensor_parallel_size=2))  # fmt: skip
    images = [png(120, 90, 3)]
    want = expected_text(oracle, tiny_model, images, "What is in this picture?", 12)
    with running_stack(cfg, timeout=180) as stack:
        c = openai.OpenAI(base_url=stack.base_url, api_key="x", max_retries=0, timeout=60)
        name = c.models.list().data[0].id
        reply = c.chat.completions.create(model=name, messages=image_messages(images),
                                          max_tokens=12, temperature=0)  # fmt: skip
        assert reply.choices[0].message.content == want
        language = stack.role("language")[0]
        pids = worker_pids(language.log_path.read_text())
    assert len(pids) == 1 and all(gone(pid) for pid in pids)  # stopped with the service
