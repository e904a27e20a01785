"""`epd bench-transfer --json` runs every backend end to end and reports numbers."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_transfer_json() -> None:
    cmd = [sys.executable, "-m", "services.cli", "bench-transfer", "--sizes", "1"]
    cmd += ["--backends", "memcpy,shm,nixl,grpc", "--repeat", "3", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["backend"] for r in rows] == ["memcpy", "shm", "nixl", "grpc"]
    assert all(r["size_mib"] == 1 and r["gbps"] > 0 for r in rows)
