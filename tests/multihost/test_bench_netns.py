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
    cmd = [sys.executable, "-m", "services.cli", "bench-transfer", "--netns", "--sizes", "1,16",
           "--repeat", "2", "--passes", "1", "--json"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    by = {(r["backend"], r["size_mib"]): r for r in rows}
    names = ["nixl", "nixl-pt", "grpc", "auto", "auto-pt", "tcp"]
    assert [r["backend"] for r in rows] == [n for n in names for _ in (1, 16)]
    assert all(r["gbps"] > 0 and r["ms"] > 0 for r in rows)
    # No RDMA between the hosts: never NIXL over TCP without its progress thread; with it,
    # NIXL for small tensors only.
    assert by[("auto", 1)]["via"] == by[("auto", 16)]["via"] == "grpc"
    assert by[("auto-pt", 1)]["via"] == "nixl" and by[("auto-pt", 16)]["via"] == "grpc"
    summary = auto_summary(rows, [1, 16])
    assert summary is not None and "at 16 MiB chose grpc" in summary
    assert netns_names() == before
