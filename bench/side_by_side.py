"""`epd bench` over several systems, workloads and load levels, interleaved, in one run.

A *cell* is one workload at one load level (e.g. "image, 8 concurrent"). For each pass, each cell
runs on every system back to back, the order of the systems rotating from pass to pass (A B, then
B A), so a slow drift of a shared machine lands on all of them alike. Every system gets the same
requests in a cell (same prompts, same image bytes, from one seed); every cell and pass gets
fresh ones, so no server answers from a cache filled by an earlier cell.

Rows report, per system and cell: output tokens/s as the median over passes, TTFT and TPOT
percentiles over the requests of all passes pooled, errors summed over passes, and the average
prompt and completion tokens the server reported (a check that both saw the same work). Each
other system gets ratios against the first one ("epd"), also per pass so the spread is visible.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

from bench.openai_load import (
    LoadShape,
    WorkloadSpec,
    build_workload,
    first_model,
    percentiles,
    run_load,
    session,
    summarize,
    tpots,
)


@dataclass(frozen=True)
class System:
    name: str
    url: str  # base URL of the OpenAI API, ending in /v1
    model: str | None  # None: the first model the server lists


@dataclass(frozen=True)
class Cell:
    workload: WorkloadSpec
    shape: LoadShape
    warmup: int  # requests run before the measured ones, not counted

    @property
    def label(self) -> str:
        load = f"rate {self.shape.rate:g}/s" if self.shape.rate else f"c={self.shape.concurrency}"
        return f"{self.workload.name} {load}"


@dataclass(frozen=True)
class Plan:
    systems: tuple[System, ...]
    cells: tuple[Cell, ...]
    passes: int
    seed: int
    api_key: str
    timeout: float


def parse_systems(base: System, against: str | None, models: str | None) -> list[System]:
    """`against`: "URL[,URL...]", each optionally "NAME=URL" (default name: host:port);
    `models`: one name for all of them or one per URL (default: each server's first)."""
    systems = [base]
    if not against:
        if models:
            raise ValueError("--against-model needs --against")
        return systems
    urls = [u.strip() for u in against.split(",") if u.strip()]
    names = [m.strip() for m in models.split(",")] if models else [None] * len(urls)
    if len(names) == 1 and len(urls) > 1:
        names = names * len(urls)
    if len(names) != len(urls):
        raise ValueError(
            f"--against-model: give one name or one per --against URL ({len(urls)}), "
            f"got {len(names)}"
        )
    for url, model in zip(urls, names, strict=True):
        name, _, rest = url.partition("=") if "=" in url.split("://")[0] else ("", "", url)
        rest = rest.rstrip("/")
        if not rest.startswith(("http://", "https://")):
            raise ValueError(f"--against: {url!r} is not an http(s) URL")
        label = name or rest.split("://", 1)[1].split("/", 1)[0]
        systems.append(System(label, rest, model or None))
    if len({s.name for s in systems}) != len(systems):
        raise ValueError(f"--against: system names must differ: {[s.name for s in systems]}")
    return systems


def cell_seed(seed: int, pass_no: int, cell_no: int, warmup: bool) -> int:
    """Distinct for every (pass, cell, warm-up or not), equal for every system."""
    return ((seed * 1009 + pass_no) * 1013 + cell_no) * 2 + int(warmup) + 1


async def run_plan(plan: Plan) -> list[dict[str, Any]]:
    """Every pass of every cell on every system; one summary per (pass, cell, system)."""
    async with session(plan.api_key, plan.timeout) as s:
        models = {x.name: x.model or await first_model(s, x.url) for x in plan.systems}
        for x in plan.systems:
            await _warm(s, x, models[x.name])
        out: list[dict[str, Any]] = []
        n = len(plan.systems)
        for p in range(plan.passes):
            order = [plan.systems[(p + k) % n] for k in range(n)]
            for ci, cell in enumerate(plan.cells):
                measured = build_workload(cell.workload, cell_seed(plan.seed, p, ci, False))
                warm_spec = replace(cell.workload, requests=cell.warmup)
                warm = build_workload(warm_spec, cell_seed(plan.seed, p, ci, True))
                for x in order:
                    desc = f"pass {p + 1}/{plan.passes} {x.name} {cell.label}"
                    if cell.warmup:
                        await run_load(s, x.url, models[x.name], warm, cell.shape, desc + " warm")
                    load0 = os.getloadavg()[0]
                    results, elapsed = await run_load(
                        s, x.url, models[x.name], measured, cell.shape, desc
                    )
                    row = summarize(x.name, results, elapsed, cell.shape)
                    row.update(
                        workload=cell.workload.name, pass_no=p, model=models[x.name],
                        loadavg=(round(load0, 2), round(os.getloadavg()[0], 2)),
                        ttft_samples=[r.ttft for r in results if r.ok],
                        tpot_samples=tpots([r for r in results if r.ok]),
                    )  # fmt: skip
                    out.append(row)
    return out


async def _warm(s: aiohttp.ClientSession, x: System, model: str) -> None:
    """One image and one text request before anything is measured (first-call costs: lazy
    initialisation, compilation of new shapes)."""
    for images in (1, 0):
        spec = WorkloadSpec("warm", 1, images, (64, 64), 4, 2)
        work = build_workload(spec, seed=999_999 + images)
        await run_load(s, x.url, model, work, LoadShape(), f"{x.name} warm-up")


def aggregate(per_pass: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (cell, system), in first-seen order (cells, then systems as given)."""
    groups: dict[tuple[str, Any, Any, str], list[dict[str, Any]]] = {}
    for r in per_pass:
        groups.setdefault((r["workload"], r["concurrency"], r["rate"], r["system"]), []).append(r)
    rows = []
    for (workload, conc, rate, system), runs in groups.items():
        errors: dict[str, int] = {}
        for r in runs:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        rows.append({
            "workload": workload, "concurrency": conc, "rate": rate, "system": system,
            "passes": len(runs), "requests": sum(r["requests"] for r in runs), "errors": errors,
            "output_tok_s": statistics.median(r["output_tok_s"] for r in runs),
            "output_tok_s_per_pass": [r["output_tok_s"] for r in runs],
            "ttft_s": percentiles([t for r in runs for t in r["ttft_samples"]]),
            "tpot_s": percentiles([t for r in runs for t in r["tpot_samples"]]),
            "prompt_tokens_avg": statistics.mean(r["prompt_tokens_avg"] for r in runs),
            "output_tokens_avg": statistics.mean(r["output_tokens_avg"] for r in runs),
        })  # fmt: skip
    return rows


def ratios(rows: list[dict[str, Any]], base: str) -> list[dict[str, Any]]:
    """`base` / other for each other system and cell: throughput (>1: base is faster), TTFT and
    TPOT p50 (<1: base is faster)."""
    by_cell: dict[tuple[str, Any, Any], dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_cell.setdefault((r["workload"], r["concurrency"], r["rate"]), {})[r["system"]] = r
    out = []
    for (workload, conc, rate), systems in by_cell.items():
        ours = systems.get(base)
        if ours is None:
            continue
        for name, other in systems.items():
            if name == base:
                continue
            out.append({
                "workload": workload, "concurrency": conc, "rate": rate,
                "systems": f"{base}/{name}",
                "output_tok_s": _div(ours["output_tok_s"], other["output_tok_s"]),
                "output_tok_s_per_pass": [
                    _div(a, b) for a, b in zip(
                        ours["output_tok_s_per_pass"], other["output_tok_s_per_pass"], strict=False
                    )
                ],
                "ttft_p50": _div(ours["ttft_s"].get("p50"), other["ttft_s"].get("p50")),
                "tpot_p50": _div(ours["tpot_s"].get("p50"), other["tpot_s"].get("p50")),
            })  # fmt: skip
    return out


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def print_report(rows: list[dict[str, Any]], rel: list[dict[str, Any]], header: str) -> None:
    print(header)
    print(f"{'workload':<9}{'load':>8}  {'system':<16}{'reqs':>5}{'err':>5}{'out tok/s':>10}"
          f"{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'TPOT p99':>10}"
          f"{'prompt':>8}{'out':>6}")  # fmt: skip
    print(f"{'':<9}{'':>8}  {'':<16}{'':>5}{'':>5}{'(median)':>10}{'ms':>10}{'ms':>10}"
          f"{'ms':>10}{'ms':>10}{'tok':>8}{'tok':>6}")  # fmt: skip
    rel_by_cell: dict[tuple[str, Any, Any], list[dict[str, Any]]] = {}
    for q in rel:
        rel_by_cell.setdefault((q["workload"], q["concurrency"], q["rate"]), []).append(q)
    last = None
    for r in rows:
        key = (r["workload"], r["concurrency"], r["rate"])
        if last is not None and key != last:
            _print_ratios(rel_by_cell.get(last, []))
        last = key
        load = f"{r['rate']:g}/s" if r["rate"] else f"c={r['concurrency']}"
        print(f"{r['workload']:<9}{load:>8}  {r['system']:<16}{r['requests']:>5}"
              f"{sum(r['errors'].values()):>5}{r['output_tok_s']:>10.1f}"
              f"{_ms(r['ttft_s'], 'p50')}{_ms(r['ttft_s'], 'p99')}"
              f"{_ms(r['tpot_s'], 'p50')}{_ms(r['tpot_s'], 'p99')}"
              f"{r['prompt_tokens_avg']:>8.0f}{r['output_tokens_avg']:>6.0f}")  # fmt: skip
        if r["errors"]:
            print(f"{'':<19}errors: {r['errors']}")
    if last is not None:
        _print_ratios(rel_by_cell.get(last, []))


def _ms(p: dict[str, float], key: str) -> str:
    return f"{p[key] * 1e3:>10.1f}" if key in p else f"{'-':>10}"


def _print_ratios(rel: list[dict[str, Any]]) -> None:
    for q in rel:
        per_pass = ", ".join(f"{v:.2f}" for v in q["output_tok_s_per_pass"] if v is not None)
        print(f"{'':<19}{q['systems']}: out tok/s {_x(q['output_tok_s'])}"
              f" (per pass {per_pass}), TTFT p50 {_x(q['ttft_p50'])},"
              f" TPOT p50 {_x(q['tpot_p50'])}")  # fmt: skip


def _x(v: float | None) -> str:
    return f"{v:.2f}x" if v is not None else "-"
