"""`epd bench-cpu-kernels`: CPU kernel questions measured side by side, each against what the
engine does now (prototypes, not wired into the engine).

    --part moe        expert formulations vs `torch_ref.fused_moe` (bench/cpu_moe.py)
    --part attention  paged gather + SDPA vs SDPA over contiguous K/V (bench/cpu_attention.py)
    --part threads    torch threads per process with an encoder and a language process
                      sharing the cores (bench/cpu_threads.py; needs --model)

Results depend on the machine and on what else runs on it: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from common.dtypes import DTYPES

PARTS = ("moe", "attention", "threads")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--part", default="moe,attention", help=f"comma-separated: {PARTS}")
    parser.add_argument("--shapes", default="small,a3b-4layer", help="small, a3b-4layer")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--tokens", default="1,8,32,256", help="moe: routed tokens per call")
    parser.add_argument("--batches", default="1,8,32", help="attention: decoding sequences")
    parser.add_argument("--context", default="128,1024", help="attention: tokens per sequence")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="threads: a checkpoint (e.g. `small`)")
    parser.add_argument("--seconds", type=float, default=6.0, help="threads: per configuration")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def run(args: argparse.Namespace) -> int:
    parts = [p for p in args.part.split(",") if p]
    if any(p not in PARTS for p in parts):
        raise SystemExit(f"epd bench-cpu-kernels: --part takes {', '.join(PARTS)}")
    if "threads" in parts and not args.model:
        raise SystemExit("epd bench-cpu-kernels: --part threads needs --model")
    shapes = [s for s in args.shapes.split(",") if s]
    dtypes = [DTYPES[d] for d in args.dtypes.split(",") if d]
    report: dict[str, Any] = {"threads": torch.get_num_threads()}
    if "moe" in parts:
        from bench import cpu_moe
        from services.language.kernels import cpu_moe as kernels

        # one compiled graph per (shape, dtype, token count): more than dynamo's default 8
        torch._dynamo.config.cache_size_limit = 64
        t0 = time.perf_counter()
        if kernels.extension() is None:
            raise SystemExit("epd bench-cpu-kernels: the C++ MoE kernel cannot run on this CPU")
        report["cpp_load_s"] = time.perf_counter() - t0
        report["moe"] = cpu_moe.run_moe(shapes, dtypes, _ints(args.tokens), args.repeats, args.seed)
    if "attention" in parts:
        from bench import cpu_attention

        report["attention"] = [
            cpu_attention.measure_attention(s, d, b, c, args.repeats, args.seed)
            for s in shapes for d in dtypes for b in _ints(args.batches)
            for c in _ints(args.context)
        ]  # fmt: skip
    if "threads" in parts:
        from bench import cpu_threads

        report["threads_rows"] = cpu_threads.run_threads(args.model, args.seconds)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"torch threads in this process: {report['threads']}")
    if "moe" in report:
        from bench import cpu_moe

        cpu_moe.print_moe(report["moe"], report["cpp_load_s"])
    if "attention" in report:
        from bench import cpu_attention

        cpu_attention.print_attention(report["attention"])
    if "threads_rows" in report:
        from bench import cpu_threads

        cpu_threads.print_threads(report["threads_rows"])
    return 0
