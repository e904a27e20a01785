"""`epd bench-engine`: the language engine against transformers on one workload, one run.

The workload is fixed by `--requests` and `--seed`: prompts of mixed lengths, mixed output
lengths, and every fourth request with one 224x224 image. Both sides do the same image work
inside each request's time: epd's request preprocesses its image bytes and runs our vision tower
(on the torch thread, in turn with the engine's steps, as `epd generate` does) before the engine
admits it; transformers' goes through its own processor and tower in `generate`. TTFT therefore
includes preprocessing and the tower on both sides. For each concurrency C:

- `epd`: the engine in this process, C requests in flight at a time (closed loop);
- `hf_sequential`: transformers' `generate`, one request at a time (measured once, the same for
  every C);
- `hf_batched`: transformers' `generate` over batches of C left-padded requests (at C = 1 that
  is the sequential run itself, which is reported again rather than measured twice).

The workload has several times more requests than the highest concurrency, so every system runs
in a steady state rather than one burst.

Every system produces exactly each request's output length (end-of-sequence ignored). TTFT and
TPOT come from per-step timestamps (a no-op logits processor for transformers).

`--tensor-parallel-size 1,2` runs the engine at each size instead of the single-device engine
(`bench/engine_parallel.py`): tokens/s, and per rank the weights held and the peak RSS.

`--device cuda` runs a different benchmark instead: decode tokens/s on a GPU, with and without
CUDA graphs, against the HBM-bandwidth limit (`bench/engine_cuda.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from bench import engine_cuda, engine_parallel
from bench.generate import synthetic_image
from bench.hf import HFReference, HFRequest
from common.contract import SamplingParams
from common.dtypes import DTYPES
from common.tokenizer import ChatTokenizer
from common.torch_thread import call_on_torch_thread, run_on_torch_thread
from services.colocated import ColocatedPipeline
from services.encoder.preprocess import preprocess
from services.language.engine.engine import Engine, ImageInput
from services.language.engine.model_runner import ModelRunner
from services.language.engine.scheduler import SchedulerConfig

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven",
         "red", "birds", "sing", "near", "blue", "water"]  # fmt: skip


IMAGE_WORK = "image preprocessing + vision tower timed on both sides (inside TTFT)"


@dataclass
class Work:
    id: str
    ids: list[int]  # prompt ids with each image's pad run expanded
    raw_images: list[bytes]  # encoded inside the timed request
    prompt: str
    output_tokens: int


@dataclass
class Timing:
    start: float
    steps: list[float]  # wall time at which each output token was produced

    @property
    def ttft(self) -> float:
        return self.steps[0] - self.start

    @property
    def tpot(self) -> float | None:
        n = len(self.steps)
        return (self.steps[-1] - self.steps[0]) / (n - 1) if n > 1 else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="checkpoint directory (e.g. a `small` one); required on the CPU, optional on CUDA",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cpu: epd vs transformers (below); cuda: decode tokens/s vs the HBM limit",
    )
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated in-flight counts")
    parser.add_argument("--requests", type=int, default=96, help="requests in the workload")
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="default: float32 on the CPU, bfloat16 on CUDA"
    )
    parser.add_argument("--kv-cache-bytes", type=int, default=512 << 20)
    parser.add_argument("--max-batch-tokens", type=int, default=1024)
    parser.add_argument("--skip-hf", action="store_true", help="measure the engine only")
    parser.add_argument(
        "--tensor-parallel-size",
        default="1",
        help="comma-separated sizes, e.g. 1,2: the engine at each (gloo workers on the CPU), "
        "with per-rank weights and peak RSS",
    )
    parser.add_argument("--json", action="store_true", help='print {"rows": [...]} as JSON')
    engine_cuda.add_arguments(parser)


def build_workload(pipe: ColocatedPipeline, n: int, seed: int) -> list[Work]:
    rng = random.Random(seed)
    work = []
    merge = pipe.cfg.vision.spatial_merge_size**2 if pipe.cfg.vision else 1
    for i in range(n):
        words = rng.randint(8, 96)
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        raw = [synthetic_image(224, 224, seed * 1000 + i)] if i % 4 == 0 and pipe.vision else []
        # Token counts from the patch grid alone; the tower runs inside the timed request.
        counts = [math.prod(preprocess(r, pipe.preprocess_cfg).grid_thw) // merge for r in raw]
        ids = pipe.prompt_ids(prompt, len(raw), counts)
        work.append(Work(f"w{i}", ids, raw, prompt, rng.choice([16, 32, 48, 64])))
    return work


async def encode(pipe: ColocatedPipeline, w: Work) -> list[ImageInput]:
    """The request's images through our preprocessing and vision tower, on the torch thread."""
    if not w.raw_images:
        return []
    tensors, grids = await run_on_torch_thread(pipe.encode_images, w.raw_images)
    return [ImageInput.of(t, g) for t, g in zip(tensors, grids, strict=True)]


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda":
        return engine_cuda.run(args)
    if not args.model:
        raise SystemExit("epd bench-engine: --model is required with --device cpu")
    args.dtype = args.dtype or "float32"
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    # All torch work (ours and transformers') on the one torch thread the engine uses, so the
    # process keeps a single OpenMP team (see common.torch_thread).
    pipe = call_on_torch_thread(ColocatedPipeline, args.model, args.dtype)
    work = call_on_torch_thread(build_workload, pipe, args.requests, args.seed)
    rows: list[dict[str, Any]] = []
    eos = pipe.tokenizer.eos_token_ids
    hf = None
    if not args.skip_hf:
        hf = call_on_torch_thread(
            HFReference, args.model, pipe.cfg, DTYPES[args.dtype], eos[-1] if eos else 0
        )
    if hf is not None:  # warm-up, not counted
        call_on_torch_thread(hf.generate, [HFRequest(work[0].ids, work[0].raw_images)], 2)
    hf_seq = call_on_torch_thread(_run_hf, hf, work, 1) if hf else None
    sizes = engine_parallel.parse_sizes(args.tensor_parallel_size)
    if sizes != [1]:
        rows += _run_sizes(pipe, work, sizes, concurrencies, args)
    for c in concurrencies:
        if sizes == [1]:
            rows.append(_row("epd", c, *asyncio.run(_run_engine(pipe, work, c, args))))
        if hf and hf_seq:
            rows.append(_row("hf_sequential", c, *hf_seq))
            batched = hf_seq if c == 1 else call_on_torch_thread(_run_hf, hf, work, c)
            rows.append(_row("hf_batched", c, *batched))
    if args.json:
        print(json.dumps({"rows": rows, "image_work": IMAGE_WORK}))
    else:
        _print(rows, args, len(work))
    return 0


def _run_sizes(
    pipe: ColocatedPipeline, work: list[Work], sizes: list[int], concurrencies: list[int],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:  # fmt: skip
    """The engine at each tensor-parallel size (one engine per size, every concurrency)."""
    rows = []
    threads = call_on_torch_thread(torch.get_num_threads)  # a size > 1 divides them per rank
    for size in sizes:
        call_on_torch_thread(torch.set_num_threads, threads)
        engine = engine_parallel.build(args, size, max(concurrencies))
        try:
            for c in concurrencies:
                row = _row("epd", c, *asyncio.run(_drive(engine, pipe, work, c)))
                rows.append({**row, "tensor_parallel_size": size})
            table = engine_parallel.ranks(engine)
        finally:
            call_on_torch_thread(engine.close)
        rows[-1]["ranks"] = table
        if not args.json:
            engine_parallel.print_ranks(size, table)
    return rows


async def _run_engine(
    pipe: ColocatedPipeline, work: list[Work], concurrency: int, args: argparse.Namespace
) -> tuple[float, list[Timing]]:
    runner = await run_on_torch_thread(
        ModelRunner, pipe.cfg, pipe.decoder, args.kv_cache_bytes, 16, pipe.dtype
    )
    sched = SchedulerConfig(max_num_seqs=concurrency, max_batch_tokens=args.max_batch_tokens)
    engine = Engine(pipe.cfg, runner, sched, frozenset(ChatTokenizer(args.model).eos_token_ids))
    return await _drive(engine, pipe, work, concurrency)


async def _drive(
    engine: Engine, pipe: ColocatedPipeline, work: list[Work], concurrency: int
) -> tuple[float, list[Timing]]:
    """`concurrency` closed-loop clients over the workload (after one warm-up request)."""
    await engine.start()
    warm = SamplingParams(max_tokens=2, ignore_eos=True)
    async for _ in engine.generate(work[0].ids, warm, await encode(pipe, work[0])):  # warm-up
        pass
    queue = list(range(len(work)))
    timings: list[Timing | None] = [None] * len(work)

    async def client() -> None:
        while queue:
            i = queue.pop(0)
            w = work[i]
            params = SamplingParams(max_tokens=w.output_tokens, ignore_eos=True)
            t = Timing(time.perf_counter(), [])
            async for _ in engine.generate(w.ids, params, await encode(pipe, w)):
                t.steps.append(time.perf_counter())
            timings[i] = t

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await engine.stop()
    return elapsed, [t for t in timings if t is not None]


def _run_hf(hf: HFReference, work: list[Work], batch: int) -> tuple[float, list[Timing]]:
    """transformers over the workload in batches of `batch` (1 = one request at a time)."""
    timings: list[Timing] = []
    t0 = time.perf_counter()
    for i in range(0, len(work), batch):
        group = work[i : i + batch]
        n = max(w.output_tokens for w in group)
        start, stamps = hf.generate([HFRequest(w.ids, w.raw_images) for w in group], n)
        # Each request's tokens are the first `output_tokens` steps of its batch.
        timings += [Timing(start, stamps[: w.output_tokens]) for w in group]
    return time.perf_counter() - t0, timings


def _row(system: str, concurrency: int, elapsed: float, timings: list[Timing]) -> dict[str, Any]:
    tokens = sum(len(t.steps) for t in timings)
    tpots = [t.tpot for t in timings if t.tpot is not None]
    return {
        "system": system,
        "concurrency": concurrency,
        "output_tok_s": tokens / elapsed,
        "ttft_p50_s": statistics.median(t.ttft for t in timings),
        "tpot_p50_s": statistics.median(tpots) if tpots else None,
        "requests": len(timings),
        "elapsed_s": elapsed,
    }


def _print(rows: list[dict[str, Any]], args: argparse.Namespace, n: int) -> None:
    print(f"model {args.model} ({args.dtype}, {torch.get_num_threads()} threads), {n} requests; "
          f"{IMAGE_WORK}")  # fmt: skip
    print(f"{'system':<15}{'conc':>5}{'out tok/s':>11}{'TTFT p50 s':>12}{'TPOT p50 s':>12}")
    base = {}
    for r in rows:
        tpot = f"{r['tpot_p50_s']:.4f}" if r["tpot_p50_s"] is not None else "-"
        tp = r.get("tensor_parallel_size")
        system = r["system"] if tp is None else f"{r['system']} tp={tp}"
        print(f"{system:<15}{r['concurrency']:>5}{r['output_tok_s']:>11.1f}"
              f"{r['ttft_p50_s']:>12.3f}{tpot:>12}")  # fmt: skip
        base[(system, r["concurrency"])] = r["output_tok_s"]
    for (system, c), value in base.items():
        if system == "epd" and ("hf_sequential", c) in base:
            seq, batched = base[("hf_sequential", c)], base[("hf_batched", c)]
            print(f"concurrency {c}: epd / hf_sequential {value / seq:.2f}x, "
                  f"epd / hf_batched {value / batched:.2f}x")  # fmt: skip
