"""`epd bench-step`: where one engine step's time goes, by component, at several batch sizes.

The real engine parts, driven one step at a time the way the engine loop drives them: the
`Scheduler` and `BlockManager` pick the chunks (pure Python, on the event loop), the step runs
through `ModelRunner.run` on the process's torch thread (`run_on_torch_thread`), then the
scheduler's `postprocess`. Synchronous timers (CPU torch ops finish before they return) split
each step into the components of `bench.step_clock` plus:

    python scheduling   schedule() + postprocess()
    thread hop          the await around run() minus run() itself (event loop <-> torch thread)

For each batch size B two kinds of step are measured, `--steps` of each (after warm-up), and
each component's median over them is reported (medians need not add up to the median total):

    decode      B requests, each decoding one token (contexts: the prompt + the tokens so far);
    prefill     B-1 requests decoding and one new request's whole prompt in the same step (at
                B = 1, a prompt alone), as when a request arrives under load.

Prompts are the `epd bench` image workload (one 224x224 image through our tower once, up front,
+ about 48 text tokens) or `--prompt text`. Allocation is not separable by timers: the report
gives the bytes allocated per step (torch.profiler's memory events, over extra steps) and the
process's minor page faults per step (fresh memory the kernel had to map), with the measured
cost of one fault, as an estimate. The hooks themselves cost a little: the report gives the
median step time with them and without them, interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import mmap
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from bench.generate import synthetic_image
from bench.openai_load import WORDS
from bench.step_clock import COMPONENTS, StepClock
from common.contract import SamplingParams
from common.dtypes import DTYPES
from common.torch_thread import call_on_torch_thread, run_on_torch_thread
from services.colocated import ColocatedPipeline
from services.language.engine.kv_cache import BlockManager
from services.language.engine.model_runner import ModelRunner
from services.language.engine.request import ImageSpan, Request
from services.language.engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig

KINDS = ("decode", "prefill")
STEP_PARTS = ("python scheduling", "thread hop", *COMPONENTS)


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    image: torch.Tensor | None  # [n_tokens, (1+D)*H], the wire tensor of the prompt's image
    grid: tuple[int, int, int] | None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (e.g. `small`)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=40, help="measured steps of each kind")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured steps of each kind")
    parser.add_argument("--prompt", choices=["image", "text"], default="image")
    parser.add_argument("--prompt-words", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    parser.add_argument("--kv-cache-bytes", type=int, default=512 << 20)
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    batches = [int(b) for b in args.batches.split(",")]
    if any(b <= 0 for b in batches) or args.steps <= 0:
        raise SystemExit("epd bench-step: --batches and --steps must be positive")
    if args.threads:
        call_on_torch_thread(torch.set_num_threads, args.threads)
    pipe = call_on_torch_thread(ColocatedPipeline, args.model, args.dtype)
    prompt = call_on_torch_thread(_prompt, pipe, args)
    runner = call_on_torch_thread(
        ModelRunner, pipe.cfg, pipe.decoder, args.kv_cache_bytes, 16, pipe.dtype
    )
    fault_us = _fault_cost_us()
    report: dict[str, Any] = {
        "model": args.model, "dtype": args.dtype, "prompt": args.prompt,
        "prompt_tokens": len(prompt.ids),
        "threads": call_on_torch_thread(torch.get_num_threads),
        "fault_us": fault_us, "cells": [],
    }  # fmt: skip
    with tqdm(total=len(batches) * len(KINDS), desc="step profile", unit="cell") as bar:
        for b in batches:
            for kind in KINDS:
                report["cells"].append(asyncio.run(_profile_cell(runner, prompt, b, kind, args)))
                bar.update(1)
    if args.json:
        print(json.dumps(report))
    else:
        _print(report)
    return 0


def _prompt(pipe: ColocatedPipeline, args: argparse.Namespace) -> Prompt:
    text = " ".join(itertools.islice(itertools.cycle(WORDS), args.prompt_words))
    if args.prompt == "text" or pipe.vision is None:
        return Prompt(pipe.prompt_ids(text, 0, []), None, None)
    tensors, grids = pipe.encode_images([synthetic_image(224, 224, 7)])
    return Prompt(pipe.prompt_ids(text, 1, [tensors[0].shape[0]]), tensors[0], grids[0])


class _Driver:
    """Requests, scheduler and runner of one measurement, stepped by hand."""

    def __init__(self, runner: ModelRunner, prompt: Prompt, batch: int, args: Any) -> None:
        self.runner, self.prompt = runner, prompt
        cfg = runner.cfg
        self.blocks = BlockManager(runner.num_blocks, runner.block_size, cfg.image_token_id)
        sched = SchedulerConfig(max_num_seqs=batch, max_batch_tokens=args.max_batch_tokens)
        self.scheduler = Scheduler(sched, self.blocks)
        self.max_tokens = 2 * (args.steps + args.warmup) + 20  # + the allocation steps
        self.ids = itertools.count()
        self.clock = StepClock()

    async def add(self) -> Request:
        n = next(self.ids)
        p = self.prompt
        spans = []
        if p.image is not None:
            image_token = self.runner.cfg.image_token_id
            start = p.ids.index(image_token) if image_token is not None else 0
            spans = [ImageSpan(start, p.image.shape[0], f"image-{n}".encode())]  # no prefix hits
        req = Request(
            f"r{n}", list(p.ids), SamplingParams(max_tokens=self.max_tokens, ignore_eos=True),
            spans, arrival=time.monotonic(),
        )  # fmt: skip
        images, grids = ([p.image], [p.grid]) if p.image is not None else ([], [])
        await run_on_torch_thread(self.runner.prepare, req, images, grids)
        self.scheduler.add(req)
        return req

    async def step(self, timed: bool) -> tuple[list[ScheduledChunk], dict[str, float]]:
        t0 = time.perf_counter()
        chunks = self.scheduler.schedule()
        t1 = time.perf_counter()
        self.clock.reset()
        samples, rs, re = await run_on_torch_thread(self._run, chunks)
        t2 = time.perf_counter()
        self.scheduler.postprocess(chunks, {rid: s.token for rid, s in samples.items()})
        t3 = time.perf_counter()
        parts = self.clock.components(rs, re) if timed else {}
        parts.update({
            "python scheduling": (t1 - t0) + (t3 - t2),
            "thread hop": (t2 - t1) - (re - rs),
            "total": t3 - t0,
        })  # fmt: skip
        return chunks, parts

    def _run(self, chunks: list[ScheduledChunk]) -> tuple[dict[str, Any], float, float]:
        rs = time.perf_counter()
        samples = self.runner.run(chunks)
        return samples, rs, time.perf_counter()


async def _profile_cell(
    runner: ModelRunner, prompt: Prompt, batch: int, kind: str, args: Any
) -> dict[str, Any]:
    d = _Driver(runner, prompt, batch, args)
    for _ in range(batch if kind == "decode" else batch - 1):
        await d.add()
    # Run the prompts in: every admitted request decodes from here on.
    while d.scheduler.waiting or any(r.num_pending > 1 for r in d.scheduler.running):
        await d.step(timed=False)

    async def one(timed: bool) -> dict[str, float]:
        if kind == "decode":
            _, parts = await d.step(timed)
            return parts
        new = await d.add()
        chunks, parts = await d.step(timed)
        if not any(c.req is new and c.length == new.num_prompt for c in chunks):
            raise RuntimeError("the new prompt did not fit in one step (raise --max-batch-tokens)")
        d.scheduler.abort(new.id)  # keep the batch at B-1 decodes + 1 prompt
        return parts

    for _ in range(args.warmup):
        await one(False)
    d.clock.attach(runner.model)
    steps: list[dict[str, float]] = []
    bare: list[float] = []
    try:
        for _ in range(args.steps):  # hooked and bare steps interleaved: the hooks' cost
            steps.append(await one(True))
            d.clock.detach()
            bare.append((await one(False))["total"])
            d.clock.attach(runner.model)
    finally:
        d.clock.detach()
    alloc = await _allocations(d, one)
    return {
        "batch": batch, "kind": kind,
        "tokens": batch if kind == "decode" else batch - 1 + len(prompt.ids),
        "context_tokens": statistics.median(r.num_tokens for r in d.scheduler.running)
        if d.scheduler.running else 0,
        "median_s": {k: statistics.median(s[k] for s in steps) for k in (*STEP_PARTS, "total")},
        "bare_total_s": statistics.median(bare),
        **alloc,
    }  # fmt: skip


async def _allocations(d: _Driver, one: Any, n: int = 5) -> dict[str, float]:
    """Bytes allocated per step (torch.profiler memory events) and minor page faults per step."""
    from torch.profiler import ProfilerActivity, profile

    faults = []
    for _ in range(n):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        await one(False)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    # The profiler records the thread that starts it: start and stop it on the torch thread.
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    await run_on_torch_thread(prof.start)
    try:
        for _ in range(n):
            await one(False)
    finally:
        await run_on_torch_thread(prof.stop)
    allocs = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]
    return {
        "alloc_mb_per_step": sum(allocs) / n / 2**20,
        "allocs_per_step": len(allocs) / n,
        "minor_faults_per_step": statistics.median(faults),
    }


def _fault_cost_us(pages: int = 16384) -> float:
    """Microseconds per minor page fault: first touch of fresh anonymous pages."""
    costs = []
    for _ in range(3):
        m = mmap.mmap(-1, pages * mmap.PAGESIZE)
        view = np.frombuffer(m, dtype=np.uint8)
        t0 = time.perf_counter()
        view[:: mmap.PAGESIZE] = 1  # one byte per page
        costs.append((time.perf_counter() - t0) / pages * 1e6)
        del view
        m.close()
    return statistics.median(costs)


def _print(report: dict[str, Any]) -> None:
    cells = report["cells"]
    print(f"model {report['model']} ({report['dtype']}, {report['threads']} torch threads), "
          f"{report['prompt']} prompt of {report['prompt_tokens']} tokens")  # fmt: skip
    print("median ms per step; dec = decode-only, pre = B-1 decodes + one whole prompt")
    heads = [f"{c['kind'][:3]} b{c['batch']}" for c in cells]
    print(f"{'component':<38}" + "".join(f"{h:>10}" for h in heads))
    print(f"{'  (tokens in the step)':<38}" + "".join(f"{c['tokens']:>10}" for c in cells))
    for part in STEP_PARTS:
        vals = [c["median_s"][part] * 1e3 for c in cells]
        if all(abs(v) < 0.005 for v in vals):
            continue
        print(f"{part:<38}" + "".join(f"{v:>10.2f}" for v in vals))
    print(f"{'total (median step)':<38}" + "".join(f"{c['median_s']['total'] * 1e3:>10.2f}"
                                                   for c in cells))  # fmt: skip
    print(f"{'total without the hooks':<38}" + "".join(f"{c['bare_total_s'] * 1e3:>10.2f}"
                                                       for c in cells))  # fmt: skip
    print(f"{'allocated MB per step':<38}" + "".join(f"{c['alloc_mb_per_step']:>10.1f}"
                                                     for c in cells))  # fmt: skip
    print(f"{'minor page faults per step':<38}" + "".join(
        f"{c['minor_faults_per_step']:>10.0f}" for c in cells))  # fmt: skip
    est = [c["minor_faults_per_step"] * report["fault_us"] / 1e3 for c in cells]
    print(f"{'  = ms of faults (est.)':<38}" + "".join(f"{v:>10.2f}" for v in est))
    print(f"(one minor fault measured at {report['fault_us']:.2f} us)")
