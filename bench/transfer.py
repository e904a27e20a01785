"""`epd bench-transfer`: consumer-side bandwidth of each transfer backend, two processes, on one
host or (`--netns`) on two hosts made of network namespaces (bench/transfer_netns.py).

For every backend and size, a loopback producer process publishes a tensor and this process
fetches it into a preallocated, prefaulted buffer; the time is the consumer's wall time from the
fetch call until the data is in its buffer and acknowledged. The reference `memcpy` (one libc
memcpy via numpy into a prefaulted buffer, as in FACTS.md) is measured in the same run, so ratios
are comparable even on a noisy machine.

Two more references show what this host allows below each backend (`bench.transfer_ceiling`):
`tcp`, a raw loopback socket, caps the gRPC stream; `cma`, a bare `process_vm_readv`, caps NIXL
on one host without RDMA. Each backend's ratio to its ceiling is printed when both ran.

More rows: `nixl-pt` is nixl with NIXL's UCX progress thread in the producer (what
`epd encoder --nixl-progress-thread` runs); `auto` is whatever the `auto` producer publishes
through for this consumer (it is told the consumer's `host_id()`, as an Encode call tells it),
and `auto-pt` the same with the progress thread; their labels say which backend that was, per
size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.transfer_ceiling import CEILINGS
from bench.transfer_ceiling import measure as measure_ceiling
from common.rpc import tensor_pb2
from common.transfer import Consumer, TransferConfig, host_id
from common.transfer.config import MIB
from common.transfer.loopback import LoopbackProducer, make_tensor

# Loopback producers: the backend they are started with, and whether NIXL's progress thread runs.
PRODUCERS = {"shm": ("shm", False), "nixl": ("nixl", False), "nixl-pt": ("nixl", True),
             "grpc": ("grpc", False), "auto": ("auto", False),
             "auto-pt": ("auto", True)}  # fmt: skip
BACKENDS = ("memcpy", *PRODUCERS, *CEILINGS)
DEFAULT_BACKENDS = "memcpy,shm,nixl,grpc,tcp,cma"
# The raw path under each backend, on one host.
CEILING_OF = {"grpc": "tcp", "nixl": "cma"}


@dataclass(frozen=True)
class Placement:
    """Where the producer runs, seen from this process (the consumer)."""

    producer_address: str = "127.0.0.1"  # TensorStore listens there, handles name it
    consumer_address: str = "127.0.0.1"  # the tcp reference listens there
    # How to start a producer-side child (None: as a plain child of this process).
    wrap: Callable[[list[str]], list[str]] | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="1,16,64", help="tensor sizes in MiB, comma separated")
    parser.add_argument(
        "--backends",
        default=None,
        help=f"subset of {','.join(BACKENDS)} (default {DEFAULT_BACKENDS}; with --netns "
        "nixl,nixl-pt,grpc,auto,auto-pt,tcp)",
    )
    parser.add_argument(
        "--repeat", type=int, default=0, help="timed fetches per cell (default: by size, 7-30)"
    )
    parser.add_argument(
        "--passes",
        type=int,
        default=None,
        help="measure every backend this many times, each pass in a rotated order, and report "
        "the median of the passes (a shared machine's load drifts; --netns default 3)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list, not a table")
    net = parser.add_argument_group("two hosts")
    net.add_argument(
        "--netns",
        action="store_true",
        help="producer and consumer on two hosts: network namespaces joined by a bridge, real "
        "TCP between them (root; removed afterwards); also says what `auto` chose and how it "
        "compares with the best backend",
    )
    net.add_argument(
        "--producer-netns",
        default=None,
        help="run producers inside this network namespace (--netns sets it; then also give "
        "--producer-address and --consumer-address, this process's address there)",
    )
    net.add_argument("--producer-address", default="127.0.0.1", help="the producer's address")
    net.add_argument("--consumer-address", default="127.0.0.1", help="this process's address")


def run(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.netns:
        from bench import transfer_netns

        return transfer_netns.run(args, sizes)
    names = [b for b in (args.backends or DEFAULT_BACKENDS).split(",") if b]
    unknown = set(names) - set(BACKENDS)
    if unknown or not sizes or min(sizes) <= 0:
        raise ValueError(f"bad --backends {sorted(unknown)} or --sizes {args.sizes!r}")
    placement = Placement()
    if args.producer_netns:
        from bench.netns import Host

        if set(names) & {"memcpy", "shm", "cma"}:
            raise ValueError("memcpy, shm and cma have no meaning across hosts")
        producer = Host("producer", args.producer_netns, args.producer_address)
        placement = Placement(args.producer_address, args.consumer_address, producer.argv)
    passes = 1 if args.passes is None else args.passes
    if passes < 1:
        raise ValueError(f"--passes must be at least 1, got {passes}")
    rows = measure_rows(names, sizes, args.repeat, placement, passes)
    if args.json:
        print(json.dumps(rows))
    else:
        print_table(rows, sizes, names)
    return 0


def measure_rows(
    names: list[str], sizes: list[int], repeat: int, placement: Placement, passes: int = 1
) -> list[dict[str, Any]]:
    """One row per backend and size; with several passes, each figure is the median of its
    passes (pass p runs the backends rotated by p, so a drift in load hits each in turn)."""
    cells: dict[str, list[dict[int, dict[str, Any]]]] = {name: [] for name in names}
    for p in range(passes):
        for name in names[p % len(names) :] + names[: p % len(names)]:
            cells[name].append(_measure(name, sizes, repeat, placement))
    rows: list[dict[str, Any]] = []
    for name in names:
        for size in sizes:
            runs = [run[size] for run in cells[name]]
            merged = {k: statistics.median(r[k] for r in runs) if isinstance(v, float) else v
                      for k, v in runs[0].items()}  # fmt: skip
            rows.append({"backend": name, "size_mib": size, **_rounded(merged)})
    return rows


def _repeats(size_mib: int, repeat: int) -> int:
    return repeat or (30 if size_mib <= 1 else 15 if size_mib <= 16 else 7)


def _rounded(cell: dict[str, Any]) -> dict[str, Any]:
    digits = {"gbps": 3, "ms": 2}
    return {k: round(v, digits.get(k, 1)) if isinstance(v, float) else v for k, v in cell.items()}


def _measure(
    backend: str, sizes: list[int], repeat: int, placement: Placement
) -> dict[int, dict[str, Any]]:
    """Per size: "gbps", the median GB/s (1e9 bytes/s), and "ms", the median fetch time; for the
    loopback backends also the mean CPU time one fetch costs the producer and the consumer
    process, in ms (all threads), and the backend the handles named ("via")."""
    if backend == "memcpy":
        result = {}
        for size in sizes:
            src = make_tensor(torch.uint8, (size * MIB,), seed=size).numpy()
            dst = np.zeros_like(src)
            times = []
            for _ in range(_repeats(size, repeat) + 2):
                start = time.perf_counter()
                np.copyto(dst, src)
                times.append(time.perf_counter() - start)
            median = statistics.median(times[2:])
            result[size] = {"gbps": size * MIB / median / 1e9, "ms": median * 1e3}
        return result
    if backend in CEILINGS:
        result = {}
        for s in sizes:
            gbps = measure_ceiling(
                backend, s * MIB, _repeats(s, repeat), placement.consumer_address, placement.wrap
            )
            result[s] = {"gbps": gbps, "ms": s * MIB / gbps / 1e6}
        return result
    pool_mib = 4 * max(sizes) + 8
    kind, progress_thread = PRODUCERS[backend]
    with (
        LoopbackProducer(
            kind,
            pool_mib=pool_mib,
            nixl_progress_thread=progress_thread,
            host=placement.producer_address,
            wrap=placement.wrap,
        ) as producer,
        Consumer(TransferConfig(fetch_timeout_s=30.0)) as consumer,
    ):
        return {size: _measure_size(producer, consumer, size, repeat) for size in sizes}


def _measure_size(
    producer: LoopbackProducer, consumer: Consumer, size: int, repeat: int
) -> dict[str, Any]:
    shape = (size * MIB,)
    out = torch.zeros(shape, dtype=torch.uint8)  # zeroed: prefaulted
    times = []
    cpu_producer = cpu_consumer = 0.0
    for i in range(_repeats(size, repeat) + 2):  # the first two warm connections and caches
        handle = _publish(producer, shape, size)
        via = handle.WhichOneof("location")
        producer_before, consumer_before = _cpu_s(producer.pid), time.process_time()
        start = time.perf_counter()
        consumer.fetch(handle, out=out)
        times.append(time.perf_counter() - start)
        if i >= 2:
            cpu_producer += _cpu_s(producer.pid) - producer_before
            cpu_consumer += time.process_time() - consumer_before
    if not torch.equal(out, make_tensor(torch.uint8, shape, seed=size)):
        raise RuntimeError(f"bench-transfer: wrong data from {producer.backends}")
    n = len(times) - 2
    median = statistics.median(times[2:])
    return {
        "gbps": size * MIB / median / 1e9,
        "ms": median * 1e3,
        "cpu_ms_producer": cpu_producer / n * 1e3,
        "cpu_ms_consumer": cpu_consumer / n * 1e3,
        "via": via,
    }


def _cpu_s(pid: int) -> float:
    """CPU seconds the threads of process `pid` and of its descendants have run, from their
    schedstat (ns precision). Descendants: on another host the producer runs under `unshare`."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):  # a thread that just exited
            total += int((task / "schedstat").read_text().split()[0])
            for child in (task / "children").read_text().split():
                total += int(_cpu_s(int(child)) * 1e9)
    return total / 1e9


def _publish(
    producer: LoopbackProducer, shape: tuple[int, ...], size: int
) -> tensor_pb2.TensorHandle:
    for _ in range(100):
        try:
            return producer.publish(torch.uint8, shape, seed=size, peer_host=host_id())
        except RuntimeError as e:  # pool full until the reaper frees the last acknowledgements
            if "PoolExhaustedError" not in str(e):
                raise
            time.sleep(0.02)
    raise RuntimeError("bench-transfer: producer pool stayed full")


def print_table(rows: list[dict[str, Any]], sizes: list[int], names: list[str]) -> None:
    by = {(r["backend"], r["size_mib"]): r for r in rows}

    def line(label: str, cells: list[str]) -> None:
        print(f"{label:<18}" + "".join(f"{c:>14}" for c in cells))

    def label(name: str) -> str:
        if not name.startswith("auto"):
            return name
        vias = dict.fromkeys(str(by[(name, s)].get("via")) for s in sizes)  # in size order
        return f"{name}>{'/'.join(vias)}"

    line("backend", [f"{s} MiB GB/s" for s in sizes])
    for name in names:
        line(label(name), [f"{by[(name, s)]['gbps']:.2f}" for s in sizes])
    print("median ms per fetch:")
    for name in names:
        line(label(name), [f"{by[(name, s)]['ms']:.2f}" for s in sizes])
    if "memcpy" in names:
        print("ratio to memcpy:")
        for name in names:
            if name != "memcpy":
                line(
                    name,
                    [f"{by[(name, s)]['gbps'] / by[('memcpy', s)]['gbps']:.2f}" for s in sizes],
                )
    below = [(b, c) for b, c in CEILING_OF.items() if b in names and c in names]
    if below:
        print("ratio to the raw path under it:")
        for name, raw in below:
            line(
                f"{name}/{raw}",
                [f"{by[(name, s)]['gbps'] / by[(raw, s)]['gbps']:.2f}" for s in sizes],
            )
    measured = [n for n in names if "cpu_ms_producer" in by[(n, sizes[0])]]
    if measured:
        print("CPU ms per fetch, producer + consumer (2 cores give 2 x the wall time):")
        for name in measured:
            cells = [by[(name, s)] for s in sizes]
            line(name, [f"{c['cpu_ms_producer']:.1f} + {c['cpu_ms_consumer']:.1f}" for c in cells])
