"""`epd bench-transfer --netns`: the backends between two hosts, made of network namespaces.

A producer host and a consumer host on one bridge (bench/netns.py), real TCP between them, no
RDMA. This process builds them, runs `bench-transfer` again on the consumer host with its
producers on the producer host (`--producer-netns`), prints that run's table and then what `auto`
chose and how it compares with the best backend there: GB/s at 16 MiB and latency at 1 MiB (or
the largest and smallest sizes measured), the two figures `auto` should match within 0.9x and
1.2x. Both namespaces and everything running in them are gone when it returns.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

from bench import netns
from bench.transfer import CEILINGS, print_table

NETNS_BACKENDS = "nixl,nixl-pt,grpc,auto,auto-pt,tcp"
NETNS_PASSES = 3


def run(args: argparse.Namespace, sizes: list[int]) -> int:
    reason = netns.available()
    if reason is not None:
        raise SystemExit(f"bench-transfer --netns {reason}")
    names = [b for b in (args.backends or NETNS_BACKENDS).split(",") if b]
    # Between namespaces every backend shares the two cores with the other: drift matters more.
    passes = NETNS_PASSES if args.passes is None else args.passes
    with netns.Fabric(["producer", "consumer"]) as net:
        producer, consumer = net["producer"], net["consumer"]
        cmd = [sys.executable, "-m", "services.cli", "bench-transfer", "--json",
               "--sizes", ",".join(map(str, sizes)), "--backends", ",".join(names),
               "--repeat", str(args.repeat), "--passes", str(passes),
               "--producer-netns", producer.netns,
               "--producer-address", producer.address,
               "--consumer-address", consumer.address]  # fmt: skip
        done = subprocess.run(consumer.argv(cmd), capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"bench-transfer on the consumer host failed:\n{done.stderr[-4000:]}")
    rows: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"two hosts: producer {producer.address}, consumer {consumer.address} (netns, bridge)")
    print_table(rows, sizes, names)
    for auto in AUTO_ROWS:
        summary = auto_summary(rows, sizes, auto)
        if summary:
            print(summary)
    return 0


AUTO_ROWS = ("auto", "auto-pt")


def auto_summary(rows: list[dict[str, Any]], sizes: list[int], auto: str = "auto") -> str | None:
    """What an auto row chose, against the best real backend: GB/s ratio at the bulk size
    (16 MiB, or the largest), latency ratio at the small size (1 MiB, or the smallest)."""
    by = {(r["backend"], r["size_mib"]): r for r in rows}
    real = sorted({r["backend"] for r in rows} - {*AUTO_ROWS, "memcpy", *CEILINGS})
    if (auto, sizes[0]) not in by or not real:
        return None
    bulk = 16 if 16 in sizes else max(sizes)
    small = 1 if 1 in sizes else min(sizes)
    fastest = max(real, key=lambda b: by[(b, bulk)]["gbps"])
    quickest = min(real, key=lambda b: by[(b, small)]["ms"])
    auto_bulk, auto_small = by[(auto, bulk)], by[(auto, small)]
    return (
        f"{auto}: at {bulk} MiB chose {auto_bulk['via']}, "
        f"{auto_bulk['gbps'] / by[(fastest, bulk)]['gbps']:.2f}x the GB/s of the best ({fastest}); "
        f"at {small} MiB chose {auto_small['via']}, "
        f"{auto_small['ms'] / by[(quickest, small)]['ms']:.2f}x the latency of the best "
        f"({quickest})"
    )
