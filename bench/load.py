"""`epd bench`: a load generator for OpenAI-compatible servers, epd's gateway first.

Each request carries `--images` synthetic images of `--image-size` (distinct per request unless
`--repeat-images`) and a prompt of `--prompt-words` words, streams, and asks for exactly
`--output-tokens` tokens (`ignore_eos`, greedy). `--workloads image,text` runs the image workload
and the same prompts without images; `--concurrency 1,8,32` runs each at several closed-loop
levels (or `--rate` requests/s, open loop). Reports output tokens/s, TTFT / TPOT p50 and p99,
errors, and the prompt and completion tokens the server reported.

`--against URL[,URL...]` runs the same requests (same prompts, same image bytes, this same
client) against other OpenAI-compatible servers too, e.g. `vllm serve` on the same checkpoint:
for every pass (`--passes N`) and every workload and load level, all systems back to back, their
order rotating from pass to pass; one row per system, plus epd's ratios to each. Name a server
with NAME=URL. The servers run side by side: an idle one should cost next to nothing (an idle
`vllm serve` used <1% of a core here), but check with `top` for yours.

The epd gateway is `--url`, or started here with `--start-stack` (`epd up` in-process).

`--compare-colocated` instead runs the same requests through the in-process colocated pipeline
(`epd generate`'s code path: the same tower and the same batching engine as the services, without
transfers, RPCs or processes) in this same run, at the same concurrency, and prints the ratio:
what disaggregation costs or gains, and nothing else. Each row reports the concurrency it ran at.
At concurrency 1 the two systems take turns request by request (which one goes first alternates),
so slow drifts of a shared machine land on both alike; at higher concurrency, or with
`--no-interleave`, the colocated run follows the gateway run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import replace
from typing import Any

from tqdm import tqdm

from bench import side_by_side as sbs
from bench.openai_load import (
    LoadShape,
    Result,
    Workload,
    WorkloadSpec,
    build_workload,
    first_model,
    parse_size,
    request,
    run_load,
    session,
    summarize,
)
from common.contract import SamplingParams

WORKLOADS = ("image", "text")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1", help="gateway base URL")
    parser.add_argument("--model", default=None, help="model name (default: the first served)")
    parser.add_argument("--api-key", default="unused", help="bearer key sent to every server")
    parser.add_argument(
        "--against",
        default=None,
        metavar="[NAME=]URL[,...]",
        help="also run every request against these OpenAI-compatible servers (base URLs ending "
        "in /v1), interleaved with epd; NAME labels the rows (default: host:port)",
    )
    parser.add_argument(
        "--against-model",
        default=None,
        metavar="NAME[,...]",
        help="model name on the --against servers: one for all or one per URL "
        "(default: each server's first)",
    )
    parser.add_argument(
        "--workloads",
        default="image",
        help="comma-separated: image (--images images per request + the prompt), text (the "
        "prompt alone); default: %(default)s",
    )
    parser.add_argument(
        "--concurrency", default="1", help="clients in a closed loop; comma-separated levels"
    )
    parser.add_argument("--rate", type=float, default=None, help="open loop: requests/s instead")
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="measured requests per workload and level (default: max(16, 4 x concurrency); "
        "32 with --rate)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="requests run (not counted) before each measured workload and level, on each "
        "system, with prompts and images of their own (default: the concurrency)",
    )
    parser.add_argument("--passes", type=int, default=1, help="repeat everything N times")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many s")
    parser.add_argument("--images", type=int, default=1, help="images per image-workload request")
    parser.add_argument("--image-size", default="224x224", help="WxH of each image")
    parser.add_argument("--repeat-images", action="store_true", help="same image every request")
    parser.add_argument(
        "--prompt-words",
        type=int,
        default=32,
        help="words of text per prompt (about 48 prompt tokens with the chat template on a "
        "make-tiny-model tokenizer; each row reports the server's own count)",
    )
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    parser.add_argument(
        "--compare-colocated",
        action="store_true",
        help="also run the workload through the in-process pipeline (--model-dir)",
    )
    parser.add_argument(
        "--model-dir", default=None, help="checkpoint for --compare-colocated / --start-stack"
    )
    parser.add_argument(
        "--start-stack",
        action="store_true",
        help="start encoders + language + gateway (epd up) for this run",
    )
    parser.add_argument("--encoders", type=int, default=1, help="with --start-stack")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="with --start-stack",
    )
    parser.add_argument(
        "--no-interleave",
        action="store_true",
        help="at concurrency 1, run the colocated requests after all gateway ones, not in turns",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def build_plan(args: argparse.Namespace, url: str) -> sbs.Plan:
    """The systems and cells the flags ask for; ValueError for inconsistent flags."""
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown or not workloads:
        raise ValueError(f"--workloads: choose from {', '.join(WORKLOADS)}, got {args.workloads}")
    levels = [int(c) for c in args.concurrency.split(",")]
    if any(c <= 0 for c in levels) or args.passes <= 0:
        raise ValueError("--concurrency and --passes must be positive")
    if args.rate:
        levels = levels[:1]  # open loop: the rate sets the load, not the clients
    size = parse_size(args.image_size)
    cells = []
    for name in workloads:
        for c in levels:
            n = args.requests or (32 if args.rate else max(16, 4 * c))
            spec = WorkloadSpec(
                name, n, args.images if name == "image" else 0, size, args.prompt_words,
                args.output_tokens, args.repeat_images,
            )  # fmt: skip
            warmup = c if args.warmup is None else args.warmup
            cells.append(sbs.Cell(spec, LoadShape(c, args.rate, args.duration), warmup))
    systems = sbs.parse_systems(
        sbs.System("epd", url.rstrip("/"), args.model), args.against, args.against_model
    )
    return sbs.Plan(
        tuple(systems), tuple(cells), args.passes, args.seed, args.api_key, args.timeout
    )


def run(args: argparse.Namespace) -> int:
    if (args.compare_colocated or args.start_stack) and not args.model_dir:
        raise SystemExit("epd bench: --compare-colocated and --start-stack need --model-dir")
    if args.compare_colocated and (args.against or "," in args.concurrency or args.passes > 1):
        raise SystemExit("epd bench: --compare-colocated runs alone (one level, one pass)")
    try:
        plan = build_plan(args, args.url)
    except ValueError as e:
        raise SystemExit(f"epd bench: {e}") from None
    if args.start_stack:
        from services.up import StackConfig, running_stack

        cfg = StackConfig(
            model=args.model_dir, encoders=args.encoders, dtype=args.dtype, http_port=0
        )
        with running_stack(cfg) as stack:
            epd = replace(plan.systems[0], url=stack.base_url)
            return _run(args, replace(plan, systems=(epd, *plan.systems[1:])))
    return _run(args, plan)


def _run(args: argparse.Namespace, plan: sbs.Plan) -> int:
    if args.compare_colocated:
        return _run_colocated(args, plan)
    per_pass = asyncio.run(sbs.run_plan(plan))
    rows = sbs.aggregate(per_pass)
    rel = sbs.ratios(rows, plan.systems[0].name)
    if args.json:
        for r in per_pass:  # raw samples stay out of the JSON; the rows carry the percentiles
            del r["ttft_samples"], r["tpot_samples"]
        print(json.dumps({"rows": rows, "ratios": rel, "passes": per_pass}))
    else:
        names = ", ".join(f"{x.name} ({x.url})" for x in plan.systems)
        head = f"systems: {names}; {plan.passes} pass(es), tok/s = median over passes, "
        sbs.print_report(rows, rel, head + "latencies = all passes' requests")
    return 0 if not any(r["errors"] for r in rows) else 1


# ------------------------------------------------------------------------------------------------
# --compare-colocated


def _run_colocated(args: argparse.Namespace, plan: sbs.Plan) -> int:
    cell = plan.cells[0]
    work = build_workload(cell.workload, args.seed)
    col = Colocated(args, work)
    interleave = cell.shape.concurrency == 1 and not args.rate and not args.no_interleave
    url = plan.systems[0].url
    reports = asyncio.run(_measure(args, work, url, col, cell.shape, interleave))
    if args.json:
        print(json.dumps({"reports": reports}))
    else:
        _print(reports)
    return 0 if not reports[0]["errors"] else 1


class Colocated:
    """The colocated pipeline (`epd generate`'s code: the encoder's preprocessing and tower and
    the language service's engine, in this process, without transfers or RPCs) answering the
    same requests at the same concurrency as the stack. TTFT is from the request's start (its
    images encoded) to its first token, as a streaming client sees it."""

    def __init__(self, args: argparse.Namespace, work: Workload) -> None:
        from services.colocated import ColocatedPipeline

        self.pipe = ColocatedPipeline(args.model_dir)
        self.work = work
        self.params = SamplingParams(max_tokens=work.output_tokens, ignore_eos=True)

    async def request(self, i: int) -> Result:
        t0 = time.perf_counter()
        ttft, tokens = 0.0, 0
        try:
            ids, images = await self.pipe.inputs(self.work.images[i], self.work.prompts[i], {})
            async for event in self.pipe.stream(ids, images, self.params):
                if event.sample is not None:
                    tokens += 1
                    ttft = ttft or time.perf_counter() - t0
        except (ValueError, RuntimeError) as e:
            return Result(False, status=type(e).__name__)
        return Result(True, ttft, time.perf_counter() - t0, tokens, "ok", len(ids))

    async def warm(self) -> None:
        warm = SamplingParams(max_tokens=2, ignore_eos=True)
        ids, images = await self.pipe.inputs(self.work.images[0], self.work.prompts[0], {})
        async for _ in self.pipe.stream(ids, images, warm):
            pass


async def run_colocated(work: Workload, col: Colocated, shape: LoadShape) -> dict[str, Any]:
    """Every request through the colocated pipeline, `shape.concurrency` at a time."""
    results: list[Result] = []
    pending = list(range(len(work.prompts)))
    bar = tqdm(total=len(pending), leave=False, desc="colocated", unit="req")

    async def client() -> None:
        while pending:
            results.append(await col.request(pending.pop(0)))
            bar.update(1)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(shape.concurrency)))
    bar.close()
    return summarize("colocated", results, time.perf_counter() - start, shape)


async def run_interleaved(
    args: argparse.Namespace, work: Workload, url: str, col: Colocated, shape: LoadShape
) -> list[dict[str, Any]]:
    """Concurrency 1, the gateway and the colocated pipeline taking turns; each system's
    throughput is over the time spent in its own requests."""
    results: dict[str, list[Result]] = {"epd": [], "colocated": []}
    busy = {"epd": 0.0, "colocated": 0.0}
    async with session(args.api_key, args.timeout) as s:
        model = args.model or await first_model(s, url)
        for i in tqdm(range(len(work.prompts)), leave=False, desc="epd | colocated", unit="pair"):
            order = ("epd", "colocated") if i % 2 == 0 else ("colocated", "epd")
            for system in order:
                t0 = time.perf_counter()
                if system == "epd":
                    r = await request(s, url, model, work, i)
                else:
                    r = await col.request(i)
                busy[system] += time.perf_counter() - t0
                results[system].append(r)
    return [summarize(name, results[name], busy[name], shape) for name in ("epd", "colocated")]


async def _measure(
    args: argparse.Namespace,
    work: Workload,
    url: str,
    col: Colocated,
    shape: LoadShape,
    interleave: bool,
) -> list[dict[str, Any]]:
    """The stack and the colocated pipeline on the same requests: in turns at concurrency 1,
    else the stack first, then the pipeline at the same concurrency."""
    await col.pipe.engine.start()
    try:
        await col.warm()
        async with session(args.api_key, args.timeout) as s:
            model = args.model or await first_model(s, url)
            warm = build_workload(WorkloadSpec("warm", 1, 1, (64, 64), 2, 2), 999_999)
            await run_load(s, url, model, warm, LoadShape(), "warm-up")
            if interleave:
                return await run_interleaved(args, work, url, col, shape)
            epd = summarize("epd", *(await run_load(s, url, model, work, shape, "requests")), shape)
        return [epd, await run_colocated(work, col, shape)]
    finally:
        await col.pipe.engine.stop()


def _print(reports: list[dict[str, Any]]) -> None:
    head = f"{'system':<10}{'reqs':>6}{'err':>5}{'req/s':>8}{'tok/s':>9}"
    head += "".join(f"{m + ' ' + p:>12}" for m in ("TTFT", "TPOT", "E2E") for p in ("p50", "p99"))
    print(head)
    for r in reports:
        row = f"{r['system']:<10}{r['requests']:>6}{sum(r['errors'].values()):>5}"
        row += f"{r['requests_per_s']:>8.2f}{r['output_tok_s']:>9.1f}"
        for m in ("ttft_s", "tpot_s", "e2e_s"):
            for p in ("p50", "p99"):
                row += f"{r[m].get(p, float('nan')):>12.4f}"
        print(row)
        if r["errors"]:
            print(f"  errors: {r['errors']}")
    if len(reports) == 2:
        epd, col = reports
        print(
            f"epd / colocated: TTFT p50 {epd['ttft_s']['p50'] / col['ttft_s']['p50']:.2f}x, "
            f"throughput {epd['output_tok_s'] / col['output_tok_s']:.2f}x"
        )
