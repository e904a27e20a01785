"""`epd bench-engine` on the CPU: both sides do the same image work inside the timed requests."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path

from bench.engine import IMAGE_WORK, _run_engine, build_workload
from common.torch_thread import call_on_torch_thread
from services.colocated import ColocatedPipeline

EPD = str(Path(sys.executable).parent / "epd")


def test_engine_side_encodes_each_image_inside_its_timed_request(tiny_model):
    pipe = call_on_torch_thread(ColocatedPipeline, str(tiny_model))
    work = call_on_torch_thread(build_workload, pipe, 8, 0)
    assert [bool(w.raw_images) for w in work] == [i % 4 == 0 for i in range(8)]
    calls: list[int] = []
    encode_images = pipe.encode_images

    def counting(images, timings=None):
        calls.append(len(images))
        return encode_images(images, timings)

    pipe.encode_images = counting  # type: ignore[method-assign]
    args = argparse.Namespace(model=str(tiny_model), kv_cache_bytes=16 << 20, max_batch_tokens=256)
    _, timings = asyncio.run(_run_engine(pipe, work, 2, args))
    assert calls == [1, 1, 1]  # the warm-up (request 0), then requests 0 and 4
    assert len(timings) == 8
    assert [len(t.steps) for t in timings] == [w.output_tokens for w in work]


def test_cli_reports_what_image_work_it_timed(tiny_model):
    out = subprocess.run(
        [EPD, "bench-engine", "--model", str(tiny_model), "--requests", "4",
         "--concurrency", "1,2", "--json"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["image_work"] == IMAGE_WORK
    systems = [(r["system"], r["concurrency"]) for r in report["rows"]]
    assert systems == [(s, c) for c in (1, 2) for s in ("epd", "hf_sequential", "hf_batched")]
    assert all(r["output_tok_s"] > 0 and r["requests"] == 4 for r in report["rows"])


def test_cli_runs_each_tensor_parallel_size_and_reports_every_rank(tiny_model):
    out = subprocess.run(
        [EPD, "bench-engine", "--model", str(tiny_model), "--requests", "4", "--concurrency",
         "2", "--tensor-parallel-size", "1,2", "--skip-hf", "--kv-cache-bytes", str(8 << 20),
         "--json"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    rows = json.loads(out.stdout.strip().splitlines()[-1])["rows"]
    assert [(r["system"], r["tensor_parallel_size"]) for r in rows] == [("epd", 1), ("epd", 2)]
    assert all(r["output_tok_s"] > 0 and r["requests"] == 4 for r in rows)
    one, two = rows[0]["ranks"], rows[1]["ranks"]
    assert [r["rank"] for r in one] == [0] and [r["rank"] for r in two] == [0, 1]
    # The split: each rank of two holds less than the whole decoder, rank 0 the vocabulary.
    assert all(r["weights_mib"] < one[0]["weights_mib"] for r in two)
    assert two[0]["weights_mib"] > two[1]["weights_mib"] and two[1]["peak_rss_mib"] > 0
