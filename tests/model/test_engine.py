"""The continuous-batching engine gives each request exactly what transformers gives it alone."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from common.config import ModelConfig
from common.contract import ContractError, PromptLimits, SamplingParams, check_prompt
from common.tokenizer import ChatTokenizer
from services.colocated import ColocatedPipeline
from services.language.engine.engine import Engine, ImageInput
from services.language.engine.model_runner import ModelRunner
from services.language.engine.scheduler import SchedulerConfig
from services.language.weights import load_decoder

PROMPTS = [
    "Describe this.",
    "What colour is the largest object in the picture, and where is it?",
    "Count.",
    "Tell me everything you can about the scene, the light, the objects and the mood.",
]


def make_engine(model_dir, kv_bytes=8 << 20, max_batch_tokens=256, max_num_seqs=32, block=16):
    cfg = ModelConfig.from_dir(model_dir)
    runner = ModelRunner(cfg, load_decoder(model_dir, cfg), kv_bytes, block_size=block)
    eos = frozenset(ChatTokenizer(model_dir).eos_token_ids)
    sched = SchedulerConfig(max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens)
    return Engine(cfg, runner, sched, eos)


def build_requests(pipe: ColocatedPipeline, png, n: int, seed: int = 0):
    """n requests: (prompt ids, image inputs, max_tokens, raw image bytes, prompt text)."""
    rng = random.Random(seed)
    sizes = [(150, 100), (64, 96), (200, 120), (90, 90), (120, 240)]
    reqs = []
    for i in range(n):
        k = rng.choice([0, 1, 1, 2])
        raw = [png(*sizes[(i + j) % len(sizes)], 100 + i * 3 + j) for j in range(k)]
        tensors, grids = pipe.encode_images(raw) if raw else ([], [])
        prompt = PROMPTS[i % len(PROMPTS)]
        ids = pipe.prompt_ids(prompt, k, [t.shape[0] for t in tensors])
        images = [ImageInput.of(t, g) for j, (t, g) in enumerate(zip(tensors, grids, strict=True))]
        reqs.append((ids, images, rng.randint(4, 20), raw, prompt))
    return reqs


async def run_all(engine: Engine, reqs, stagger: float = 0.01, seeds=None, params_for=None):
    """Every request at once (request i after `stagger * i` s); `params_for(i, max_tokens)`
    gives its sampling (default: greedy, or temperature 1 with `seeds[i]`)."""
    await engine.start()

    def default_params(i: int, max_tokens: int) -> SamplingParams:
        seed = seeds[i] if seeds else None
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if seeds else 0.0, seed=seed)

    async def one(i, ids, images, max_tokens):
        await asyncio.sleep(stagger * i)
        params = (params_for or default_params)(i, max_tokens)
        tokens, final = [], None
        async for ev in engine.generate(ids, params, images):
            if ev.sample is not None:
                tokens.append(ev.sample.token)
            final = ev
        return tokens, final

    try:
        return await asyncio.gather(
            *(one(i, ids, imgs, mt) for i, (ids, imgs, mt, _, _) in enumerate(reqs))
        )
    finally:
        await engine.stop()


def expected_tokens(oracle, model_dir, reqs):
    hf = oracle(model_dir)
    return [hf.generate(hf.inputs(raw, prompt), mt) for _, _, mt, raw, prompt in reqs]


def test_staggered_concurrent_requests_match_transformers_alone(tiny_model, oracle, png):
    pipe = ColocatedPipeline(tiny_model)
    reqs = build_requests(pipe, png, 18)
    engine = make_engine(tiny_model, max_batch_tokens=96)
    results = asyncio.run(run_all(engine, reqs))
    expected = expected_tokens(oracle, tiny_model, reqs)
    for (tokens, final), want in zip(results, expected, strict=True):
        assert tokens == want
        assert final.finish_reason in ("stop", "length")
        assert final.usage.completion_tokens == len(tokens)
    assert engine.blocks.num_used == 0


def test_preemption_keeps_results_exact(tiny_model, oracle, png):
    pipe = ColocatedPipeline(tiny_model)
    reqs = build_requests(pipe, png, 8, seed=1)
    # 12 blocks of 16 tokens: not enough for 8 prompts of ~40-110 tokens at once.
    engine = make_engine(tiny_model, kv_bytes=12 * 16 * 4 * 2 * 2 * 16 * 4, max_batch_tokens=512)
    results = asyncio.run(run_all(engine, reqs, stagger=0.0))
    assert engine.scheduler.num_preemptions > 0
    for (tokens, _), want in zip(results, expected_tokens(oracle, tiny_model, reqs), strict=True):
        assert tokens == want
    assert engine.blocks.num_used == 0


def test_chunked_prefill_keeps_results_exact(tiny_model, oracle, png):
    pipe = ColocatedPipeline(tiny_model)
    reqs = build_requests(pipe, png, 4, seed=2)
    engine = make_engine(tiny_model, max_batch_tokens=7)  # every prompt spans many steps
    results = asyncio.run(run_all(engine, reqs))
    for (tokens, _), want in zip(results, expected_tokens(oracle, tiny_model, reqs), strict=True):
        assert tokens == want


def test_repeated_image_hits_the_prefix_cache(tiny_model, oracle, png):
    pipe = ColocatedPipeline(tiny_model)
    raw = [png(150, 100, 42)]
    tensors, grids = pipe.encode_images(raw)
    ids = pipe.prompt_ids("Describe this.", 1, [tensors[0].shape[0]])
    image = [ImageInput.of(tensors[0], grids[0])]
    reqs = [(ids, image, 8, raw, "Describe this.")] * 2
    engine = make_engine(tiny_model, block=4)
    results = asyncio.run(run_all(engine, reqs, stagger=0.5))
    want = expected_tokens(oracle, tiny_model, reqs[:1])[0]
    assert [r[0] for r in results] == [want, want]
    assert results[0][1].usage.cached_tokens == 0
    assert results[1][1].usage.cached_tokens > 0.8 * len(ids)


def test_text_only_requests_on_plain_qwen3_moe_match_transformers(tiny_text_moe, oracle):
    pipe = ColocatedPipeline(tiny_text_moe)
    reqs = [(pipe.prompt_ids(p, 0, []), [], 10 + i, [], p) for i, p in enumerate(PROMPTS)]
    results = asyncio.run(run_all(make_engine(tiny_text_moe), reqs))
    for (tokens, _), want in zip(
        results, expected_tokens(oracle, tiny_text_moe, reqs), strict=True
    ):
        assert tokens == want


def test_seeded_sampling_is_reproducible_whatever_runs_beside_it(tiny_model, png):
    pipe = ColocatedPipeline(tiny_model)
    reqs = build_requests(pipe, png, 6, seed=3)
    alone = asyncio.run(run_all(make_engine(tiny_model), reqs[:1], seeds=[7]))
    crowd = asyncio.run(run_all(make_engine(tiny_model), reqs, seeds=[7, 1, 2, 3, 4, 5]))
    assert alone[0][0] == crowd[0][0]
    other_seed = asyncio.run(run_all(make_engine(tiny_model), reqs[:1], seeds=[8]))
    assert other_seed[0][0] != alone[0][0]


def test_bad_requests_are_refused_by_the_contract_before_the_engine(tiny_model):
    """The boundary's one check (`check_prompt`) refuses what the engine must never see; what
    the engine itself refuses leaves no reservation, block or stream behind."""
    engine = make_engine(tiny_model)
    cfg = engine.cfg
    limits = PromptLimits(cfg.text.vocab_size, engine.max_model_len, cfg.image_token_id)
    cases = [
        ([], [], {}, "prompt is empty"),
        ([1, 2, 10_000], [], {}, "outside the vocabulary"),
        ([1] * engine.max_model_len, [], {}, "maximum context length"),
        ([1, 2, 3], [4], {}, "image-pad tokens"),
        ([1, 2, 3], [], {"max_tokens": engine.max_model_len}, "maximum context length"),
        ([1, 2, 3], [], {"stop_token_ids": (10_000,)}, "stop_token_ids"),
    ]
    for ids, counts, kw, message in cases:
        with pytest.raises(ContractError, match=message):
            check_prompt(ids, counts, SamplingParams(**kw), limits)
    with pytest.raises(ContractError, match="temperature"):
        SamplingParams(temperature=-1.0)

    async def first(ids, images):
        await engine.start()
        try:
            async for _ in engine.generate(ids, SamplingParams(), images):
                break
        finally:
            await engine.stop()

    img = ImageInput.of(torch.zeros(4, 256), (1, 4, 4))
    with pytest.raises(ValueError, match="image-pad tokens"):
        asyncio.run(first([1, 2, 3], [img]))
    assert engine.blocks.num_used == 0 and engine.held_image_bytes == 0
    assert engine.running_ids == set()


def _top2_margin(hf, inputs, prefix: list[int]) -> float:
    """transformers' margin between its two most likely next tokens after `prefix`."""
    ids = torch.cat([inputs["input_ids"], torch.tensor([prefix], dtype=torch.long)], dim=1)
    extended = {**inputs, "input_ids": ids}
    if "mm_token_type_ids" in inputs:
        pad = torch.zeros(1, len(prefix), dtype=inputs["mm_token_type_ids"].dtype)
        extended["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], pad], dim=1)
    top = hf.logits(extended)[-1].topk(2).values
    return float(top[0] - top[1])


def test_the_cpu_expert_kernel_keeps_transformers_greedy_tokens(small_model, oracle, png):
    """The small preset's experts run through the C++ kernel where the CPU has one (their sizes
    fit its tiles): batched, chunked requests with images give transformers' greedy tokens; a
    token may differ only where transformers' own top-2 margin is below 1e-3 (fp32 GEMM
    rounding, ~1e-6, can then flip it)."""
    from services.language.kernels import cpu_moe

    pipe = ColocatedPipeline(small_model)
    experts = pipe.decoder.model.layers[0].mlp.experts
    assert experts.gate_up_proj.ndim == (4 if cpu_moe.supported() else 3)
    reqs = build_requests(pipe, png, 5, seed=11)
    engine = make_engine(small_model, kv_bytes=64 << 20, max_batch_tokens=48)
    results = asyncio.run(run_all(engine, reqs))
    hf = oracle(small_model)
    for (tokens, _), (_, _, mt, raw, prompt) in zip(results, reqs, strict=True):
        inputs = hf.inputs(raw, prompt)
        want = hf.generate(inputs, mt)
        j = next((i for i, (a, b) in enumerate(zip(tokens, want, strict=True)) if a != b), None)
        if j is not None:
            assert _top2_margin(hf, inputs, want[:j]) < 1e-3, (j, tokens, want)
