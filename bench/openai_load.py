"""The load client of `epd bench`: streaming chat requests through the OpenAI HTTP API.

One request function and one load loop serve every system under test (epd's gateway, vLLM, any
OpenAI-compatible server), so a side-by-side run differs only in the URL. A request asks for
exactly `output_tokens` tokens (`ignore_eos`, greedy) with `stream_options.include_usage`, and
records:

- TTFT: time to the first chunk that carries a choice. epd's gateway sends its first chunk (the
  role) when the first token exists, and so does vLLM; the first chunk with *text* can come later
  (a token that ends inside a UTF-8 character streams as "" until the next completes it; a
  make-tiny-model tokenizer names every other id, see services/tiny_model.py), so it is kept
  apart as `ttft_text`;
- end-to-end time, and the prompt/completion token counts of the server's own usage report
  (so a row shows whether both servers saw the same prompt and made the same number of tokens);
- TPOT = (e2e - TTFT) / (completion tokens - 1).

A request fails on a non-200 status, an error event in the stream, a transport error, or a
stream that ends without any choice.
"""

from __future__ import annotations

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

# One token each with a space before them, in make-tiny-model's tokenizer (and in real ones).
WORDS = ["picture", "image", "the", "quick", "brown", "fox", "lazy", "dog", "cat", "red", "chair",
         "blue", "sky", "green", "grass", "text"]  # fmt: skip


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    status: str = ""
    prompt_tokens: int = 0
    ttft_text: float | None = None  # first chunk with non-empty text, if any


@dataclass(frozen=True)
class WorkloadSpec:
    """What each request of a workload looks like."""

    name: str  # a label in reports ("image", "text")
    requests: int
    images: int  # per request; 0 = text only
    image_size: tuple[int, int]  # (width, height)
    prompt_words: int
    output_tokens: int
    repeat_images: bool = False  # the same image in every request (cache hits after the first)


@dataclass
class Workload:
    prompts: list[str]
    images: list[list[bytes]]
    output_tokens: int
    results: list[Result] = field(default_factory=list)


def build_workload(spec: WorkloadSpec, seed: int) -> Workload:
    """Prompts and images from `seed` alone: the same seed gives every system the same requests,
    and distinct seeds give distinct images and prompts (no cache hits from an earlier run)."""
    rng = random.Random(seed)
    w, h = spec.image_size
    prompts, images = [], []
    for i in range(spec.requests):
        prompts.append(" ".join(rng.choice(WORDS) for _ in range(spec.prompt_words)))
        per_request = [i * 16 + j for j in range(spec.images)]
        seeds = [0] * spec.images if spec.repeat_images else per_request
        images.append([synthetic_image(w, h, seed * 100_003 + s) for s in seeds])
    return Workload(prompts, images, spec.output_tokens)


def parse_size(text: str) -> tuple[int, int]:
    """ "WxH" -> (W, H)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"image size must look like 224x224, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {text!r}")
    return w, h


def session(api_key: str, timeout: float) -> aiohttp.ClientSession:
    headers = {"Authorization": f"Bearer {api_key}"}
    return aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=timeout))


async def first_model(s: aiohttp.ClientSession, url: str) -> str:
    async with s.get(f"{url}/models") as r:
        r.raise_for_status()
        return str((await r.json())["data"][0]["id"])


async def request(s: aiohttp.ClientSession, url: str, model: str, work: Workload, i: int) -> Result:
    """Request i of `work`, streamed; never raises for a failed request (see `Result.status`)."""
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
    ttft, ttft_text, tokens, prompt_tokens, chunks = 0.0, None, 0, 0, 0
    try:
        async with s.post(f"{url}/chat/completions", json=body) as r:
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
                    prompt_tokens = msg["usage"]["prompt_tokens"]
                for choice in msg.get("choices") or ():
                    now = time.perf_counter() - start
                    chunks += 1
                    ttft = ttft or now
                    if ttft_text is None and (choice.get("delta") or {}).get("content"):
                        ttft_text = now
    except (aiohttp.ClientError, TimeoutError) as e:
        return Result(False, status=type(e).__name__)
    e2e = time.perf_counter() - start
    if not chunks:
        return Result(False, status="empty-stream")
    return Result(True, ttft, e2e, tokens, "200", prompt_tokens, ttft_text)


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@dataclass(frozen=True)
class LoadShape:
    """How requests arrive: `concurrency` clients in a closed loop, or Poisson arrivals at
    `rate` requests/s (then concurrency is unbounded); stop early after `duration` s."""

    concurrency: int = 1
    rate: float | None = None
    duration: float | None = None


async def run_load(
    s: aiohttp.ClientSession, url: str, model: str, work: Workload, shape: LoadShape, desc: str
) -> tuple[list[Result], float]:
    """Every request of `work` (in order) under `shape`: (results, elapsed seconds)."""
    bar = tqdm(total=len(work.prompts), desc=desc, unit="req", leave=False)
    results: list[Result] = []
    deadline = time.perf_counter() + shape.duration if shape.duration else None

    async def one(i: int) -> None:
        results.append(await request(s, url, model, work, i))
        bar.update(1)

    start = time.perf_counter()
    if shape.rate:
        tasks = []
        for i in range(len(work.prompts)):
            if deadline and time.perf_counter() > deadline:
                break
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(random.expovariate(shape.rate))
        await asyncio.gather(*tasks)
    else:
        pending = list(range(len(work.prompts)))

        async def client() -> None:
            while pending and not (deadline and time.perf_counter() > deadline):
                await one(pending.pop(0))

        await asyncio.gather(*(client() for _ in range(shape.concurrency)))
    elapsed = time.perf_counter() - start
    bar.close()
    return results, elapsed


def summarize(
    system: str, results: list[Result], elapsed: float, shape: LoadShape
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.status] = errors.get(r.status, 0) + 1
    return {
        "system": system,
        "concurrency": shape.concurrency if not shape.rate else None,
        "rate": shape.rate,
        "requests": len(results),
        "errors": errors,
        "elapsed_s": elapsed,
        "requests_per_s": len(ok) / elapsed if elapsed else 0.0,
        "output_tok_s": sum(r.output_tokens for r in ok) / elapsed if elapsed else 0.0,
        "prompt_tokens_avg": statistics.mean(r.prompt_tokens for r in ok) if ok else 0.0,
        "output_tokens_avg": statistics.mean(r.output_tokens for r in ok) if ok else 0.0,
        "ttft_s": percentiles([r.ttft for r in ok]),
        "ttft_text_s": percentiles([r.ttft_text for r in ok if r.ttft_text is not None]),
        "tpot_s": percentiles(tpots(ok)),
        "e2e_s": percentiles([r.e2e for r in ok]),
    }


def tpots(results: list[Result]) -> list[float]:
    return [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in results if r.output_tokens > 1]


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)
    pick = {p: values[min(len(values) - 1, int(p / 100 * len(values)))] for p in (90, 99)}
    return {"p50": statistics.median(values), "p90": pick[90], "p99": pick[99]}
