"""`epd bench-encoder --json`: both serving modes and the bare-tower ceiling, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_encoder_json(tiny_model: Path) -> None:
    cmd = [sys.executable, "-m", "services.cli", "bench-encoder", "--model", str(tiny_model)]
    cmd += ["--images", "6", "--clients", "3", "--rounds", "1", "--sizes", "64x64,96x96,128x96"]
    cmd.append("--json")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    modes = {r["mode"]: r for r in report["results"]}
    assert modes["single"]["forwards"] == 6  # one image per forward
    assert 2 <= modes["batched"]["forwards"] <= 6
    assert report["speedup"] > 0
    tower = report["tower_only"]
    assert tower["single_images_per_s"] > 0 and tower["batched_images_per_s"] > 0


def test_bench_encoder_video_json(tiny_model: Path) -> None:
    """`--video synthetic`: distinct clips through the service, sampled frames and video tokens
    counted from the replies (40 frames at 10 fps, 2 fps sampled: 8 frames, 4 temporal
    patches of 4 x 5 merged tokens at 160x120 -> 128x160)."""
    cmd = [sys.executable, "-m", "services.cli", "bench-encoder", "--model", str(tiny_model)]
    cmd += ["--video", "synthetic", "--synthetic-videos", "4", "--clients", "2", "--rounds", "1"]
    cmd.append("--json")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    modes = {r["mode"]: r for r in report["results"]}
    assert modes["single"]["forwards"] == 4  # one video per forward
    for r in modes.values():
        assert (r["videos"], r["frames"], r["tokens"]) == (4, 32, 4 * 4 * 20)
        assert r["frames_per_s"] > 0 and r["tokens_per_s"] > 0
