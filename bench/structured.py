"""`epd bench-structured`: what structured decoding costs a decode step, every row constrained.

The real engine parts, as the engine loop drives them: `--batch` requests with the same text
prompt are prefilled, then decode steps run through `ModelRunner.run` (forward, logits, sampler)
and `Scheduler.postprocess` (which appends each token and so advances its grammar). Two batches
take turns step by step, one with every row constrained by a JSON schema (an object holding a
long array of short strings, so that no row finishes during the run) and one unconstrained, at
the same context lengths; the report gives both medians and the difference as a share of the
unconstrained step. The structured parts are also timed alone on the constrained batch's own
matchers each step: the batched bitmask fill (xgrammar, host), applying it to `[B, V]` logits,
and advancing every matcher by one token (on forks, so the run itself is untouched).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from bench.openai_load import WORDS
from common.contract import SamplingParams, StructuredOutput
from common.tokenizer import ChatTokenizer
from common.torch_thread import call_on_torch_thread, set_torch_threads
from services.language.engine.builder import EngineConfig, build_engine
from services.language.engine.engine import Engine
from services.language.engine.grammar import GrammarConstraint, apply_bitmask, fill_bitmasks
from services.language.engine.request import Request
from services.language.engine.scheduler import Scheduler, SchedulerConfig

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 16},
        "kind": {"enum": ["report", "note", "list"]},
        "items": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 200},
    },
    "required": ["title", "kind", "items"],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (e.g. `small`)")
    parser.add_argument("--batch", type=int, default=32, help="rows per decode step")
    parser.add_argument("--steps", type=int, default=30, help="measured steps of each batch")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured steps of each batch")
    parser.add_argument("--prompt-words", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    # Everything on the process's torch thread, as the engine runs it: a forward on a second
    # thread would get a second OpenMP team beside the one warm-up started.
    call_on_torch_thread(set_torch_threads, args.threads)
    report = call_on_torch_thread(measure, args)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0


def measure(args: argparse.Namespace) -> dict[str, Any]:
    b = args.batch
    limits = SchedulerConfig(max_num_seqs=2 * b, max_batch_tokens=8192)
    engine = build_engine(EngineConfig(args.model, limits, args.dtype, kv_cache_bytes=1 << 30))
    tok = ChatTokenizer(args.model)
    text = " ".join(WORDS[i % len(WORDS)] for i in range(args.prompt_words))
    ids = tok.encode(tok.render([{"role": "user", "content": text}]))
    spec = StructuredOutput.json_schema(SCHEMA)
    assert engine.grammars is not None
    compiled = engine.grammars.compile_now(spec)
    grammars = engine.grammars
    constrained = _batch(engine, ids, b, "c", lambda: grammars.constraint(compiled))
    plain = _batch(engine, ids, b, "p", lambda: None)
    times: dict[str, list[float]] = {"constrained": [], "unconstrained": [], "fill": [],
                                     "apply": [], "accept": []}  # fmt: skip
    vocab = engine.cfg.text.vocab_size
    for step in range(args.warmup + args.steps):
        measured = step >= args.warmup
        for name, sched in (("constrained", constrained), ("unconstrained", plain)):
            chunks = sched.schedule()
            assert len(chunks) == b and all(c.length == 1 for c in chunks), "not a decode step"
            if name == "constrained" and measured and chunks[0].req.constraint is not None:
                _time_parts(times, [c.req.constraint for c in chunks], vocab)  # type: ignore[misc]
            t0 = time.perf_counter()
            samples = engine.runner.run(chunks)
            sched.postprocess(chunks, {rid: s.token for rid, s in samples.items()})
            if measured:
                times[name].append(time.perf_counter() - t0)
            assert len(sched.running) == b, "a row finished; the schema should keep them going"
    med = {k: statistics.median(v) if v else 0.0 for k, v in times.items()}
    return {
        "model": args.model,
        "batch": b,
        "steps": args.steps,
        "vocab": vocab,
        "median_s": med,
        "overhead_share": (med["constrained"] - med["unconstrained"]) / med["unconstrained"],
        "parts_share": (med["fill"] + med["apply"] + med["accept"]) / med["unconstrained"],
    }


def _batch(engine: Engine, ids: list[int], b: int, tag: str, constraint: Any) -> Scheduler:
    """`b` requests with their prompts prefilled, in a scheduler of their own (one KV pool)."""
    sched = Scheduler(engine.scheduler.cfg, engine.blocks)
    for i in range(b):
        req = Request(id=f"{tag}{i}", prompt_ids=list(ids), eos_token_ids=engine.eos_token_ids,
                      params=SamplingParams(max_tokens=4096, temperature=1.0, seed=i,
                                            ignore_eos=True))  # fmt: skip
        engine.runner.prepare(req, [], [])
        req.constraint = constraint()
        sched.add(req)
    while any(r.num_computed < r.num_prompt for r in [*sched.waiting, *sched.running]):
        chunks = sched.schedule()
        samples = engine.runner.run(chunks)
        sched.postprocess(chunks, {rid: s.token for rid, s in samples.items()})
    return sched


def _time_parts(times: dict[str, list[float]], cs: list[GrammarConstraint], vocab: int) -> None:
    rows = list(range(len(cs)))
    t0 = time.perf_counter()
    mask = fill_bitmasks(cs, rows, len(cs), vocab)
    t1 = time.perf_counter()
    logits = torch.zeros(len(cs), vocab)
    t2 = time.perf_counter()
    apply_bitmask(logits, mask, rows)
    t3 = time.perf_counter()
    forks = [c.matcher.fork() for c in cs]
    picks = [int(torch.isfinite(logits[i]).nonzero()[0]) for i in rows]
    t4 = time.perf_counter()
    for m, t in zip(forks, picks, strict=True):
        m.accept_token(t)
    t5 = time.perf_counter()
    times["fill"].append(t1 - t0)
    times["apply"].append(t3 - t2)
    times["accept"].append(t5 - t4)


def format_report(r: dict[str, Any]) -> str:
    m = r["median_s"]
    ms = {k: 1e3 * v for k, v in m.items()}
    return "\n".join([
        f"structured decoding, {r['model']}: batch {r['batch']}, vocab {r['vocab']}, "
        f"median of {r['steps']} decode steps",
        f"  decode step, unconstrained      {ms['unconstrained']:8.2f} ms",
        f"  decode step, every row a schema {ms['constrained']:8.2f} ms  "
        f"(+{100 * r['overhead_share']:.1f}% of the unconstrained step)",
        f"  alone: bitmask fill {ms['fill']:.2f} ms, apply {ms['apply']:.2f} ms, "
        f"accept {ms['accept']:.2f} ms = {100 * r['parts_share']:.1f}% of the step",
    ])  # fmt: skip
