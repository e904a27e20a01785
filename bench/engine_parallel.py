"""`epd bench-engine --tensor-parallel-size 1,2`: the engine at each tensor-parallel size on the
same workload, tokens/s per concurrency, and what each rank holds.

Each size gets an engine built the one way (`build_engine`: at N > 1, N-1 worker processes over
gloo, every rank with cores / N torch threads), driven by the same closed-loop clients as the
single-device run. Per rank it reports the weights it holds and its peak resident memory
(VmHWM, read from /proc at the end of the run). Rank 0 is this process, which also holds the
vision tower, the benchmark's own copy of the decoder and (without --skip-hf) transformers';
the workers' figures are the clean ones: the torch runtime plus their shard and KV cache.
On a 2-core CPU no speed-up is expected (the ranks share the cores and add two all-reduces per
layer); the memory split is the point there.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from common.torch_thread import call_on_torch_thread
from services.language.engine.builder import EngineConfig, build_engine
from services.language.engine.engine import Engine
from services.language.engine.scheduler import SchedulerConfig
from services.language.parallel.config import ParallelConfig
from services.language.parallel.report import RankMemory


def parse_sizes(text: str) -> list[int]:
    sizes = [int(s) for s in text.split(",")]
    if any(s < 1 for s in sizes):
        raise SystemExit(f"epd bench-engine: --tensor-parallel-size takes sizes >= 1, got {text}")
    return sizes


def build(args: argparse.Namespace, size: int, max_seqs: int) -> Engine:
    cfg = EngineConfig(
        args.model, scheduler=SchedulerConfig(max_num_seqs=max_seqs,
                                              max_batch_tokens=args.max_batch_tokens),
        dtype=args.dtype, kv_cache_bytes=args.kv_cache_bytes,
        parallel=ParallelConfig(tensor_parallel_size=size),
    )  # fmt: skip
    return call_on_torch_thread(build_engine, cfg)


def ranks(engine: Engine) -> list[dict[str, Any]]:
    """Per rank: weights held and peak RSS so far."""
    runner = engine.runner
    reports = [RankMemory.of(0, runner.model, runner.device)]
    pids = [os.getpid()]
    if runner.workers is not None:
        reports += runner.workers.reports
        pids += [p.pid for p in runner.workers.procs if p.pid is not None]
    return [{"rank": r.rank, "pid": pid, "weights_mib": r.weight_bytes / 2**20,
             "peak_rss_mib": vm_hwm_bytes(pid) / 2**20}
            for r, pid in zip(reports, pids, strict=True)]  # fmt: skip


def vm_hwm_bytes(pid: int) -> int:
    """A process's peak resident set (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmHWM for pid {pid}")


def print_ranks(size: int, table: list[dict[str, Any]]) -> None:
    threads = call_on_torch_thread(torch.get_num_threads)
    print(f"tensor-parallel size {size}, {threads} torch threads per rank:")
    for r in table:
        print(f"  rank {r['rank']} (pid {r['pid']}): weights {r['weights_mib']:.1f} MiB, "
              f"peak RSS {r['peak_rss_mib']:.1f} MiB")  # fmt: skip
