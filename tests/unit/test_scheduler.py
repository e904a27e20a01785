"""Scheduler and block manager invariants, without torch."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from services.language.engine.kv_cache import BlockManager
from services.language.engine.request import ImageSpan, Request, SamplingParams, Status
from services.language.engine.scheduler import QueueFull, Scheduler, SchedulerConfig

IMG = 99


def make_request(rid: str, prompt: list[int], max_tokens: int = 4, images=()) -> Request:
    return Request(
        id=rid,
        prompt_ids=prompt,
        params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        images=list(images),
    )


def run_to_completion(sched: Scheduler, live: list[Request], rng: random.Random, abort_p=0.0):
    steps = 0
    while sched.has_work:
        chunks = sched.schedule()
        assert chunks, "scheduler stalled with work pending"
        assert sum(c.length for c in chunks) <= sched.cfg.max_batch_tokens
        assert len(sched.running) <= sched.cfg.max_num_seqs
        assert len({c.req.id for c in chunks}) == len(chunks)
        for c in chunks:  # every scheduled token has a slot
            assert len(c.req.block_table) * sched.blocks.block_size >= c.start + c.length
        sampled = {c.req.id: rng.randrange(1000) for c in chunks if c.samples}
        sched.postprocess(chunks, sampled)
        if abort_p and sched.running and rng.random() < abort_p:
            sched.abort(rng.choice(sched.running).id)
        sched.blocks.check([r for r in live if r.status is not Status.FINISHED])
        steps += 1
        assert steps < 10_000
    return steps


@pytest.mark.parametrize("seed", range(12))
def test_random_workload_never_leaks_or_double_owns_blocks(seed):
    rng = random.Random(seed)
    blocks = BlockManager(num_blocks=rng.randint(12, 40), block_size=rng.choice([2, 4, 8]),
                          image_token_id=IMG)  # fmt: skip
    sched = Scheduler(
        SchedulerConfig(max_num_seqs=rng.randint(1, 8), max_batch_tokens=rng.randint(8, 64)),
        blocks,
    )
    live = []
    hashes = [b"cat", b"dog", b"fox"]
    for i in range(rng.randint(5, 25)):
        prompt = [rng.randrange(50) for _ in range(rng.randint(1, 30))]
        spans = []
        if rng.random() < 0.5:
            start = rng.randrange(len(prompt))
            length = rng.randint(1, 8)
            prompt[start:start] = [IMG] * length
            spans.append(ImageSpan(start, length, rng.choice(hashes)))
        req = make_request(f"r{i}", prompt, rng.randint(1, 12), spans)
        if req.num_prompt + req.params.max_tokens > 12 * blocks.block_size:
            continue  # keep every request admissible even when it has the cache to itself
        sched.add(req)
        live.append(req)
    run_to_completion(sched, live, rng, abort_p=0.05)
    assert blocks.num_used == 0 and blocks.num_free == len(blocks.blocks)
    for req in live:
        assert req.finished
        if req.finish_reason == "length":
            assert len(req.output_ids) == req.params.max_tokens


def test_tiny_cache_forces_preemption_and_everyone_finishes():
    rng = random.Random(0)
    blocks = BlockManager(num_blocks=6, block_size=4, image_token_id=IMG)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_batch_tokens=64), blocks)
    live = [make_request(f"r{i}", list(range(i, i + 6)), max_tokens=10) for i in range(4)]
    for r in live:
        sched.add(r)
    run_to_completion(sched, live, rng)
    assert sum(r.num_preemptions for r in live) > 0
    assert all(len(r.output_ids) == 10 for r in live)
    assert blocks.num_used == 0


def test_long_prompt_is_chunked_across_steps():
    blocks = BlockManager(num_blocks=64, block_size=4, image_token_id=IMG)
    sched = Scheduler(SchedulerConfig(max_batch_tokens=10), blocks)
    req = make_request("long", list(range(35)), max_tokens=2)
    sched.add(req)
    lengths = []
    while sched.has_work:
        chunks = sched.schedule()
        lengths.append([c.length for c in chunks])
        sched.postprocess(chunks, {c.req.id: 7 for c in chunks if c.samples})
    assert lengths == [[10], [10], [10], [5], [1]]


def test_prefix_hits_share_blocks_for_the_same_image_only():
    blocks = BlockManager(num_blocks=64, block_size=4, image_token_id=IMG)
    sched = Scheduler(SchedulerConfig(), blocks)
    prompt = [1, 2, 3] + [IMG] * 8 + [4, 5, 6, 7]

    def serve(rid: str, image_hash: bytes) -> Request:
        req = make_request(rid, list(prompt), 2, [ImageSpan(3, 8, image_hash)])
        sched.add(req)
        run_to_completion(sched, [req], random.Random(1))
        return req

    first = serve("a", b"img-1")
    same = serve("b", b"img-1")
    other = serve("c", b"img-2")
    assert first.num_cached_prompt == 0
    assert same.num_cached_prompt == 12  # 3 full blocks of 4; the last token is never a hit
    assert other.num_cached_prompt == 0  # block 0 mixes text and the image's first row
    assert blocks.hit_tokens_total == 12


def test_decoded_blocks_are_registered_as_they_fill():
    blocks = BlockManager(num_blocks=64, block_size=4, image_token_id=IMG)
    sched = Scheduler(SchedulerConfig(), blocks)
    first = make_request("a", list(range(10)), max_tokens=30)
    sched.add(first)
    rng = random.Random(3)
    while sched.has_work:
        chunks = sched.schedule()
        sched.postprocess(chunks, {c.req.id: rng.randrange(50) for c in chunks if c.samples})
        blocks.check([first] if not first.finished else [])
    # A follow-up turn carrying the whole first exchange hits every full block of it: the
    # prompt's and the ones decoding filled, registered step by step.
    follow = make_request("b", first.prompt_ids + first.output_ids + [7, 7], max_tokens=1)
    sched.add(follow)
    sched.schedule()
    assert follow.num_cached_prompt == (10 + 30 - 1) // 4 * 4  # the last computed token: 39


def test_abort_frees_blocks_at_once_and_queue_bound():
    blocks = BlockManager(num_blocks=16, block_size=4, image_token_id=IMG)
    sched = Scheduler(SchedulerConfig(max_waiting=2), blocks)
    a, b = make_request("a", list(range(9)), 8), make_request("b", [1, 2], 8)
    sched.add(a)
    sched.add(b)
    with pytest.raises(QueueFull):
        sched.add(make_request("c", [1], 1))
    chunks = sched.schedule()
    sched.postprocess(chunks, {c.req.id: 5 for c in chunks if c.samples})
    assert blocks.num_used > 0
    assert sched.abort("a") is a and a.finish_reason == "abort"
    assert sched.abort("b") is b
    assert blocks.num_used == 0 and not sched.has_work
    assert sched.abort("nope") is None


def test_sampling_params_validation_names_the_field():
    for kwargs, field in [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"logprobs": 50}, "logprobs"),
    ]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)


def test_engine_accounting_imports_no_torch():
    code = (
        "import sys; import services.language.engine.scheduler, services.language.engine.kv_cache;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_block_hits_only_under_the_same_prefix_chain():
    """Equal tokens in block 1 do not share KV when block 0 differs: the digest chains the
    parent's, and a lookup compares digests of the whole prefix, not the block's own tokens."""
    blocks = BlockManager(num_blocks=64, block_size=4, image_token_id=IMG)
    sched = Scheduler(SchedulerConfig(), blocks)
    rng = random.Random(5)
    a = make_request("a", [1, 2, 3, 4, 9, 9, 9, 9, 5], 2)
    sched.add(a)
    run_to_completion(sched, [a], rng)
    b = make_request("b", [6, 7, 8, 0, 9, 9, 9, 9, 5], 2)
    sched.add(b)
    run_to_completion(sched, [b], rng)
    c = make_request("c", [1, 2, 3, 4, 9, 9, 9, 9, 5], 2)
    sched.add(c)
    run_to_completion(sched, [c], rng)
    assert b.num_cached_prompt == 0 and c.num_cached_prompt == 8
    assert all(len(blk.hash or b"") in (0, 16) for blk in blocks.blocks)  # 128-bit digests


def test_prefill_chunks_are_capped_while_requests_decode():
    blocks = BlockManager(num_blocks=64, block_size=4, image_token_id=IMG)
    sched = Scheduler(SchedulerConfig(max_batch_tokens=64, prefill_budget_with_decodes=5), blocks)
    first = make_request("a", list(range(10)), max_tokens=50)
    sched.add(first)
    steps = []
    for _ in range(6):
        if _ == 1:  # `a` decodes from now on; a long prompt arrives
            sched.add(make_request("b", list(range(100, 120)), max_tokens=4))
        chunks = sched.schedule()
        steps.append(sorted((c.req.id, c.length) for c in chunks))
        sched.postprocess(chunks, {c.req.id: 7 for c in chunks if c.samples})
    # Nothing decodes at first: the prompt takes the step. Then `b` gets 5 tokens a step beside
    # `a`'s decode, until its prompt is done.
    assert steps == [[("a", 10)], [("a", 1), ("b", 5)], [("a", 1), ("b", 5)],
                     [("a", 1), ("b", 5)], [("a", 1), ("b", 5)], [("a", 1), ("b", 1)]]  # fmt: skip
