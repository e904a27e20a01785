"""Structured decoding and n sequences in the continuous-batching engine: constrained rows obey
their grammars whatever runs beside them (preemption included), and their unconstrained
neighbours still get exactly transformers' greedy tokens."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from common.config import ModelConfig
from common.contract import ConstraintKind, ContractError, SamplingParams, StructuredOutput
from common.tokenizer import ChatTokenizer
from services.colocated import ColocatedPipeline
from services.language.engine.engine import Engine
from services.language.engine.grammar import GrammarCompiler
from services.language.engine.model_runner import ModelRunner
from services.language.engine.scheduler import SchedulerConfig
from services.language.weights import load_decoder
from tests.model.test_engine import build_requests, expected_tokens, run_all

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["cat", "dog"]},
        "inner": {"type": "object", "properties": {"ok": {"type": "boolean"},
                                                   "name": {"type": "string", "maxLength": 6}},
                  "required": ["ok", "name"]},
    },
    "required": ["id", "kind", "inner"],
}  # fmt: skip
REGEX = r"[a-f]{2,4}-[0-9]{2}"


def make_engine(model_dir, kv_bytes=8 << 20, max_batch_tokens=256):
    cfg = ModelConfig.from_dir(model_dir)
    runner = ModelRunner(cfg, load_decoder(model_dir, cfg), kv_bytes, block_size=16)
    eos = frozenset(ChatTokenizer(model_dir).eos_token_ids)
    grammars = GrammarCompiler.from_model_dir(model_dir, cfg.text.vocab_size, sorted(eos))
    sched = SchedulerConfig(max_num_seqs=32, max_batch_tokens=max_batch_tokens)
    return Engine(cfg, runner, sched, eos, grammars=grammars)


def specs(i: int) -> StructuredOutput | None:
    """Every other request unconstrained; the rest a schema, a regex or a choice."""
    return [None, StructuredOutput.json_schema(SCHEMA), None, StructuredOutput(
        ConstraintKind.REGEX, REGEX), None, StructuredOutput(
        ConstraintKind.CHOICE, choices=("alpha", "beta gamma"))][i % 6]  # fmt: skip


async def run(engine: Engine, reqs, temperature: float, stagger: float = 0.0):
    def params(i: int, max_tokens: int) -> SamplingParams:
        spec = specs(i)
        return SamplingParams(
            max_tokens=max_tokens if spec is None else 120,
            temperature=0.0 if spec is None else temperature,
            seed=i,
            structured=spec,
        )

    return await run_all(engine, reqs, stagger, params_for=params)


def check_constrained(tokenizer, i: int, tokens: list[int], reason: str) -> None:
    spec = specs(i)
    assert spec is not None
    text = tokenizer.decode(tokens)
    assert reason == "stop", (i, text)
    if spec.kind == ConstraintKind.JSON_SCHEMA:
        jsonschema.validate(json.loads(text), SCHEMA)
    elif spec.kind == ConstraintKind.REGEX:
        assert re.fullmatch(REGEX, text), text
    else:
        assert text in spec.choices


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_constrained_rows_obey_and_their_neighbours_match_transformers(
    tiny_model, oracle, png, temperature
):
    pipe = ColocatedPipeline(tiny_model)
    reqs = build_requests(pipe, png, 12, seed=5)
    engine = make_engine(tiny_model, max_batch_tokens=512)
    results = asyncio.run(run(engine, reqs, temperature))
    free = [i for i in range(len(reqs)) if specs(i) is None]
    want = expected_tokens(oracle, tiny_model, [reqs[i] for i in free])
    for i, w in zip(free, want, strict=True):
        assert results[i][0] == w, i
    tok = ChatTokenizer(tiny_model)
    for i, (tokens, final) in enumerate(results):
        if specs(i) is not None:
            check_constrained(tok, i, tokens, final.finish_reason)
    assert engine.blocks.num_used == 0


def test_grammars_survive_preemption_and_recompute(tiny_model, png):
    pipe = ColocatedPipeline(tiny_model)
    reqs = build_requests(pipe, png, 12, seed=6)
    # 14 blocks of 16 tokens for 12 requests of ~40-110 prompt tokens: preemptions.
    engine = make_engine(tiny_model, kv_bytes=14 * 16 * 4 * 2 * 2 * 16 * 4, max_batch_tokens=512)
    results = asyncio.run(run(engine, reqs, 1.0))
    assert engine.scheduler.num_preemptions > 0
    tok = ChatTokenizer(tiny_model)
    for i, (tokens, final) in enumerate(results):
        if specs(i) is not None:
            check_constrained(tok, i, tokens, final.finish_reason)
    assert engine.blocks.num_used == 0


def test_grammars_compile_once_off_the_loop_and_bad_ones_name_the_problem(tiny_model):
    engine = make_engine(tiny_model)
    grammars = engine.grammars
    assert grammars is not None
    spec = StructuredOutput.json_schema(SCHEMA)

    async def main():
        first = await asyncio.gather(*(grammars.compile(spec) for _ in range(4)))
        again = await grammars.compile(
            StructuredOutput.json_schema(json.dumps(SCHEMA, sort_keys=True))
        )
        return first, again

    first, again = asyncio.run(main())
    assert grammars.compiled_total == 1  # four concurrent compiles shared one, then the cache
    assert [c for _, c in first].count(False) == 1 and again[1] is True
    bad = [
        (StructuredOutput(ConstraintKind.REGEX, "[a-"), "invalid regex"),
        (StructuredOutput(ConstraintKind.GRAMMAR, "root ::= undefined_rule"), "invalid grammar"),
        (StructuredOutput.json_schema({"type": "nonsense"}), "invalid json schema"),
    ]
    for s, message in bad:
        with pytest.raises(ContractError, match=message):
            grammars.compile_now(s)


def test_n_sequences_prefill_once_and_reproduce(tiny_model, png):
    pipe = ColocatedPipeline(tiny_model)
    ids, images, _, _, _ = build_requests(pipe, png, 1, seed=7)[0]

    async def three(engine: Engine):
        await engine.start()
        out: dict[int, list[int]] = {}
        usage = {}
        try:
            params = SamplingParams(max_tokens=6, temperature=1.0, seed=3, n=3)
            async for batch in engine.generate_batches(ids, params, images):
                for ev in batch:
                    if ev.sample is not None:
                        out.setdefault(ev.index, []).append(ev.sample.token)
                    if ev.finish_reason is not None:
                        usage[ev.index] = ev.usage
        finally:
            await engine.stop()
        return out, usage

    engine = make_engine(tiny_model)
    out, usage = asyncio.run(three(engine))
    full = (len(ids) - 1) // 16 * 16
    assert engine.blocks.hit_tokens_total == 2 * full  # sequences 1 and 2 took the prompt's
    assert usage[0].cached_tokens == 0 and usage[1].cached_tokens == usage[2].cached_tokens == full
    assert len({tuple(v) for v in out.values()}) == 3
    again, _ = asyncio.run(three(make_engine(tiny_model)))
    assert again == out
    assert engine.blocks.num_used == 0


def test_a_reasoning_reply_thinks_freely_and_answers_under_the_grammar(tiny_model):
    """`after_token` (a Thinking model's `</think>`): nothing is masked until the reply has
    generated that token; from the next token on, the grammar holds. The greedy reply's own
    first token stands in for `</think>`, so that the switch happens at a known place."""
    tok = ChatTokenizer(tiny_model)
    ids = tok.encode(tok.render([{"role": "user", "content": "Think first."}]))

    async def reply(params: SamplingParams) -> list[int]:
        engine = make_engine(tiny_model)
        await engine.start()
        try:
            return [ev.sample.token async for ev in engine.generate(ids, params) if ev.sample]
        finally:
            await engine.stop()

    free = asyncio.run(reply(SamplingParams(max_tokens=8)))
    gate = free[0]
    spec = StructuredOutput(ConstraintKind.REGEX, REGEX, after_token=gate)
    out = asyncio.run(reply(SamplingParams(max_tokens=40, structured=spec)))
    assert out[0] == gate  # unconstrained before the gate
    assert re.fullmatch(REGEX, tok.decode(out[1:])), tok.decode(out)
    assert not re.fullmatch(REGEX, tok.decode(free[1:]))  # the grammar made the difference
