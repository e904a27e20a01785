"""`epd bench-transfer --json` runs every backend and both raw references end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.transfer_ceiling import measure


def test_bench_transfer_json() -> None:
    cmd = [sys.executable, "-m", "services.cli", "bench-transfer", "--sizes", "1"]
    cmd += ["--backends", "memcpy,shm,nixl,grpc,tcp,cma", "--repeat", "3", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["backend"] for r in rows] == ["memcpy", "shm", "nixl", "grpc", "tcp", "cma"]
    assert all(r["size_mib"] == 1 and r["gbps"] > 0 for r in rows)
    # The loopback backends also say what one fetch costs each process in CPU.
    timed = {r["backend"] for r in rows if r.get("cpu_ms_consumer", 0) > 0}
    assert timed == {"shm", "nixl", "grpc"}
    grpc_row = rows[3]
    assert grpc_row["cpu_ms_producer"] > 0  # the producer streams every byte itself


def test_table_shows_each_backend_against_its_raw_path() -> None:
    cmd = [sys.executable, "-m", "services.cli", "bench-transfer", "--sizes", "1"]
    cmd += ["--backends", "memcpy,grpc,tcp", "--repeat", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "ratio to memcpy:" in out and "grpc/tcp" in out and "nixl/cma" not in out


@pytest.mark.parametrize("kind", ["tcp", "cma"])
def test_ceiling_reference_runs(kind: str) -> None:
    # `measure` itself checks that every byte arrived.
    assert measure(kind, 1 << 20, repeats=1) > 0


def test_unknown_ceiling_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown ceiling"):
        measure("rdma", 1 << 20, repeats=1)
