"""`epd bench --against`: the pure parts (systems, plan, aggregation, ratios)."""

from __future__ import annotations

import argparse

import pytest

from bench import load
from bench.openai_load import WorkloadSpec, build_workload
from bench.side_by_side import System, aggregate, cell_seed, parse_systems, ratios

EPD = System("epd", "http://127.0.0.1:1/v1", None)


def test_against_urls_get_names_and_models():
    systems = parse_systems(EPD, "vllm=http://h:8001/v1/, http://other:9/v1", "small")
    assert systems == [
        EPD,
        System("vllm", "http://h:8001/v1", "small"),
        System("other:9", "http://other:9/v1", "small"),
    ]
    two = parse_systems(EPD, "http://a:1/v1,http://b:2/v1", "m1,m2")
    assert [s.model for s in two] == [None, "m1", "m2"]


@pytest.mark.parametrize(
    ("against", "models", "match"),
    [
        ("ftp://x/v1", None, "not an http"),
        ("http://a:1/v1,http://b:2/v1", "m1,m2,m3", "one per"),
        ("epd=http://a:1/v1", None, "must differ"),
        (None, "m", "needs --against"),
    ],
)
def test_bad_against_flags_are_refused(against, models, match):
    with pytest.raises(ValueError, match=match):
        parse_systems(EPD, against, models)


def plan_args(**kw):
    parser = argparse.ArgumentParser()
    load.add_arguments(parser)
    args = parser.parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_plan_has_one_cell_per_workload_and_level():
    args = plan_args(workloads="image,text", concurrency="1,8", against="vllm=http://v:1/v1")
    plan = load.build_plan(args, "http://e:1/v1/")
    assert [s.name for s in plan.systems] == ["epd", "vllm"]
    assert plan.systems[0].url == "http://e:1/v1"
    cells = [(c.workload.name, c.workload.images, c.shape.concurrency, c.workload.requests,
              c.warmup) for c in plan.cells]  # fmt: skip
    assert cells == [("image", 1, 1, 16, 1), ("image", 1, 8, 32, 8),
                     ("text", 0, 1, 16, 1), ("text", 0, 8, 32, 8)]  # fmt: skip
    with pytest.raises(ValueError, match="workloads"):
        load.build_plan(plan_args(workloads="video"), "http://e:1/v1")


def test_workloads_are_the_same_for_a_seed_and_fresh_across_cells():
    spec = WorkloadSpec("image", 3, 1, (32, 32), 8, 4)
    a, b = build_workload(spec, 5), build_workload(spec, 5)
    assert a.prompts == b.prompts and a.images == b.images
    seeds = {cell_seed(0, p, c, w) for p in range(3) for c in range(4) for w in (False, True)}
    assert len(seeds) == 3 * 4 * 2
    other = build_workload(spec, cell_seed(0, 1, 0, False))
    assert not set(map(bytes, (i[0] for i in a.images))) & {i[0] for i in other.images}


def row(system, p, tok_s, ttft, tpot):
    return {
        "system": system, "workload": "text", "concurrency": 8, "rate": None, "pass_no": p,
        "requests": 2, "errors": {"500": 1} if system == "x" and p == 1 else {},
        "output_tok_s": tok_s, "prompt_tokens_avg": 48.0, "output_tokens_avg": 32.0,
        "ttft_samples": ttft, "tpot_samples": tpot,
    }  # fmt: skip


def test_rows_take_median_throughput_and_pool_latencies_and_ratios_are_per_pass():
    per_pass = [
        row("epd", 0, 100.0, [0.1, 0.3], [0.01]), row("x", 0, 200.0, [0.2], [0.02]),
        row("x", 1, 400.0, [0.4], [0.04]), row("epd", 1, 100.0, [0.2], [0.02]),
        row("epd", 2, 130.0, [0.1], [0.03]), row("x", 2, 260.0, [0.2], [0.02]),
    ]  # fmt: skip
    rows = aggregate(per_pass)
    assert [r["system"] for r in rows] == ["epd", "x"]
    epd, x = rows
    assert epd["output_tok_s"] == 100.0 and x["output_tok_s"] == 260.0
    assert epd["ttft_s"]["p50"] == pytest.approx(0.15) and epd["requests"] == 6
    assert x["errors"] == {"500": 1} and epd["errors"] == {}
    (rel,) = ratios(rows, "epd")
    assert rel["systems"] == "epd/x"
    assert rel["output_tok_s"] == pytest.approx(100 / 260)
    assert rel["output_tok_s_per_pass"] == pytest.approx([0.5, 0.25, 0.5])
    assert rel["ttft_p50"] == pytest.approx(0.15 / 0.2)
