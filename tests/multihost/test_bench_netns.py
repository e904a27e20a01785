"""`epd bench-transfer --netns`: producer and consumer on two hosts (network namespaces), every
backend measured across them, `auto` choosing grpc where there is no RDMA, nothing left after."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.netns import available
from bench.transfer_netns import auto_summary

REASON = available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"multi-host tests: {REASON}")


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_bench_transfer_across_two_hosts() -> None:
    before = netns_names()
    cmd = [sys.executable, "-m", "services.cli", "bench-transfer", "--netns", "--sizes", "1",
           "--repeat", "2", "--json"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["backend"] for r in rows] == ["nixl", "nixl-pt", "grpc", "auto", "tcp"]
    assert all(r["gbps"] > 0 and r["ms"] > 0 for r in rows)
    auto = rows[3]
    assert auto["via"] == "grpc"  # no RDMA between the hosts: not NIXL over TCP
    assert {r["via"] for r in rows[:3]} == {"nixl", "grpc"}
    summary = auto_summary(rows, [1])
    assert summary is not None and summary.startswith("auto chose grpc")
    assert netns_names() == before
