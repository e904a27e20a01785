"""`epd bench`: a load generator for a running gateway (OpenAI streaming API).

Closed loop with `--concurrency` clients, or open loop at `--rate` requests/s, for `--requests`
requests or `--duration` seconds. Each request carries `--images` synthetic images of
`--image-size` (distinct per request unless `--repeat-images`) and a prompt of about
`--prompt-words` words, and asks for exactly `--output-tokens` tokens (`ignore_eos`). Reports
throughput and TTFT / TPOT / end-to-end percentiles, and errors by status.

`--compare-colocated` also runs the same requests through the in-process colocated pipeline
(`epd generate`'s code path: the same tower and the same batching engine as the services, without
transfers, RPCs or processes) in this same run, at the same concurrency, and prints the ratio:
what disaggregation costs or gains, and nothing else. Each row reports the concurrency it ran at.
At concurrency 1 the two systems take turns request by request (which one goes first
alternates), so slow drifts of a shared machine land on both alike; at higher concurrency, or
with `--no-interleave`, the colocated run follows the gateway run. The gateway is given by
`--url`, or started here with `--start-stack` (`epd up` in-process).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from tqdm import tqdm

from bench.generate import synthetic_image
from common.contract import SamplingParams

WORDS = ["picture", "describe", "colour", "shape", "light", "scene", "object", "detail", "left",
         "right", "top", "bottom", "small", "large", "bright", "dark"]  # fmt: skip


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    status: str = ""


@dataclass
class Workload:
    prompts: list[str]
    images: list[list[bytes]]
    output_tokens: int
    results: list[Result] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1", help="gateway base URL")
    parser.add_argument("--model", default=None, help="model name (default: the first served)")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--concurrency", type=int, default=1, help="clients in a closed loop")
    parser.add_argument("--rate", type=float, default=None, help="open loop: requests/s instead")
    parser.add_argument("--requests", type=int, default=32, help="requests to send")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many s")
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--image-size", default="448x448", help="WxH of each image")
    parser.add_argument("--repeat-images", action="store_true", help="same image every request")
    parser.add_argument("--prompt-words", type=int, default=32)
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
        "--no-interleave",
        action="store_true",
        help="at concurrency 1, run the colocated requests after all gateway ones, not in turns",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def build_workload(args: argparse.Namespace) -> Workload:
    rng = random.Random(args.seed)
    w, h = (int(v) for v in args.image_size.lower().split("x"))
    prompts, images = [], []
    for i in range(args.requests):
        prompts.append(" ".join(rng.choice(WORDS) for _ in range(args.prompt_words)))
        seeds = (
            [0] * args.images if args.repeat_images else [i * 16 + j for j in range(args.images)]
        )
        images.append([synthetic_image(w, h, args.seed * 100_003 + s) for s in seeds])
    return Workload(prompts, images, args.output_tokens)


async def run_gateway(args: argparse.Namespace, work: Workload, url: str) -> dict[str, Any]:
    async with _session(args) as session:
        model = args.model or await _first_model(session, url)
        bar = tqdm(total=len(work.prompts), desc="requests", unit="req", leave=False)
        results: list[Result] = []
        deadline = time.perf_counter() + args.duration if args.duration else None

        async def one(i: int) -> None:
            results.append(await _request(session, url, model, work, i))
            bar.update(1)

        start = time.perf_counter()
        if args.rate:
            tasks = []
            for i in range(len(work.prompts)):
                if deadline and time.perf_counter() > deadline:
                    break
                tasks.append(asyncio.create_task(one(i)))
                await asyncio.sleep(random.expovariate(args.rate))
            await asyncio.gather(*tasks)
        else:
            pending = list(range(len(work.prompts)))

            async def client() -> None:
                while pending and not (deadline and time.perf_counter() > deadline):
                    await one(pending.pop(0))

            await asyncio.gather(*(client() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - start
        bar.close()
    return summarize("epd", results, elapsed, args)


def _session(args: argparse.Namespace) -> aiohttp.ClientSession:
    headers = {"Authorization": f"Bearer {args.api_key}"}
    return aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=args.timeout))


async def _first_model(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(f"{url}/models") as r:
        r.raise_for_status()
        return str((await r.json())["data"][0]["id"])


async def _request(
    session: aiohttp.ClientSession, url: str, model: str, work: Workload, i: int
) -> Result:
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": _data_url(img)}} for img in work.images[i]
    ]
    content.append({"type": "text", "text": work.prompts[i]})
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": work.output_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft, tokens = 0.0, 0
    try:
        async with session.post(f"{url}/chat/completions", json=body) as r:
            if r.status != 200:
                await r.read()
                return Result(False, status=str(r.status))
            async for line in r.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                msg = json.loads(line[6:])
                if "error" in msg:
                    return Result(False, status="stream-error")
                if msg.get("usage"):
                    tokens = msg["usage"]["completion_tokens"]
                # The gateway sends its first chunk when the first token exists (text may lag:
                # a token can end inside a UTF-8 character, or decode to nothing).
                if not ttft:
                    ttft = time.perf_counter() - start
    except (aiohttp.ClientError, TimeoutError) as e:
        return Result(False, status=type(e).__name__)
    e2e = time.perf_counter() - start
    return Result(True, ttft or e2e, e2e, tokens, "200")


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


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
        return Result(True, ttft, time.perf_counter() - t0, tokens, "ok")


async def run_colocated(args: argparse.Namespace, work: Workload, col: Colocated) -> dict[str, Any]:
    """Every request through the colocated pipeline, `--concurrency` at a time (closed loop)."""
    results: list[Result] = []
    pending = list(range(len(work.prompts)))
    bar = tqdm(total=len(pending), leave=False, desc="colocated", unit="req")

    async def client() -> None:
        while pending:
            results.append(await col.request(pending.pop(0)))
            bar.update(1)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(args.concurrency)))
    bar.close()
    return summarize("colocated", results, time.perf_counter() - start, args)


async def run_interleaved(
    args: argparse.Namespace, work: Workload, url: str, col: Colocated
) -> list[dict[str, Any]]:
    """Concurrency 1, the gateway and the colocated pipeline taking turns; each system's
    throughput is over the time spent in its own requests."""
    results: dict[str, list[Result]] = {"epd": [], "colocated": []}
    busy = {"epd": 0.0, "colocated": 0.0}
    async with _session(args) as session:
        model = args.model or await _first_model(session, url)
        for i in tqdm(range(len(work.prompts)), leave=False, desc="epd | colocated", unit="pair"):
            order = ("epd", "colocated") if i % 2 == 0 else ("colocated", "epd")
            for system in order:
                t0 = time.perf_counter()
                if system == "epd":
                    r = await _request(session, url, model, work, i)
                else:
                    r = await col.request(i)
                busy[system] += time.perf_counter() - t0
                results[system].append(r)
    return [summarize(name, results[name], busy[name], args) for name in ("epd", "colocated")]


def summarize(
    system: str, results: list[Result], elapsed: float, args: argparse.Namespace
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.status] = errors.get(r.status, 0) + 1
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "system": system,
        "concurrency": args.concurrency if not args.rate else None,
        "rate": args.rate,
        "requests": len(results),
        "errors": errors,
        "elapsed_s": elapsed,
        "requests_per_s": len(ok) / elapsed if elapsed else 0.0,
        "output_tok_s": sum(r.output_tokens for r in ok) / elapsed if elapsed else 0.0,
        "ttft_s": _percentiles([r.ttft for r in ok]),
        "tpot_s": _percentiles(tpots),
        "e2e_s": _percentiles([r.e2e for r in ok]),
    }


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)
    pick = {p: values[min(len(values) - 1, int(p / 100 * len(values)))] for p in (90, 99)}
    return {"p50": statistics.median(values), "p90": pick[90], "p99": pick[99]}


def run(args: argparse.Namespace) -> int:
    if (args.compare_colocated or args.start_stack) and not args.model_dir:
        raise SystemExit("epd bench: --compare-colocated and --start-stack need --model-dir")
    work = build_workload(args)
    col = Colocated(args, work) if args.compare_colocated else None
    interleave = (
        col is not None and args.concurrency == 1 and not args.rate and not args.no_interleave
    )
    if args.start_stack:
        from services.up import StackConfig, running_stack

        cfg = StackConfig(model=args.model_dir, encoders=args.encoders, http_port=0)
        with running_stack(cfg) as stack:
            reports = asyncio.run(_measure(args, work, stack.base_url, col, interleave))
    else:
        reports = asyncio.run(_measure(args, work, args.url, col, interleave))
    if args.json:
        print(json.dumps({"reports": reports}))
    else:
        _print(reports)
    return 0 if not reports[0]["errors"] else 1


async def _measure(
    args: argparse.Namespace, work: Workload, url: str, col: Colocated | None, interleave: bool
) -> list[dict[str, Any]]:
    await _warm(args, url)
    if col is None:
        return [await run_gateway(args, work, url)]
    await col.pipe.engine.start()
    try:
        await _warm_colocated(col)
        if interleave:
            return await run_interleaved(args, work, url, col)
        # The stack first, then the colocated pipeline at the same concurrency.
        return [await run_gateway(args, work, url), await run_colocated(args, work, col)]
    finally:
        await col.pipe.engine.stop()


async def _warm_colocated(col: Colocated) -> None:
    warm = SamplingParams(max_tokens=2, ignore_eos=True)
    ids, images = await col.pipe.inputs(col.work.images[0], col.work.prompts[0], {})
    async for _ in col.pipe.stream(ids, images, warm):
        pass


async def _warm(args: argparse.Namespace, url: str) -> None:
    """One request through every stage before measuring (first-call costs are not the system's)."""
    w = Workload(["warm up"], [[synthetic_image(64, 64, 999_999)]], 2)
    ns = argparse.Namespace(**{**vars(args), "requests": 1, "rate": None, "concurrency": 1})
    await run_gateway(ns, w, url)


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
