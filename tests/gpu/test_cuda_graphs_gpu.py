"""CUDA-graph decode on the GPU: the engine's greedy tokens with graphs equal its eager tokens on
the tiny checkpoint (fp32), with batches shrinking through padded buckets, and every bucket was
captured and replayed. Engine modules are imported inside the tests (see test_kernels_gpu.py)."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from tests.gpu.conftest import requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]


async def _greedy(engine, prompts: list[tuple[list[int], int]]) -> list[list[int]]:
    from common.contract import SamplingParams

    async def one(ids: list[int], max_tokens: int) -> list[int]:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        return [e.sample.token async for e in engine.generate(ids, params) if e.sample]

    await engine.start()
    try:
        return list(await asyncio.gather(*(one(ids, n) for ids, n in prompts)))
    finally:
        await engine.stop()


def test_cuda_graph_greedy_matches_eager(tiny_checkpoint, monkeypatch) -> None:
    from common.config import ModelConfig
    from services.language.engine.engine import Engine
    from services.language.engine.model_runner import ModelRunner
    from services.language.engine.scheduler import SchedulerConfig
    from services.language.weights import load_decoder

    monkeypatch.delenv("EPD_CUDA_GRAPHS", raising=False)
    monkeypatch.delenv("EPD_KERNELS", raising=False)
    cfg = ModelConfig.from_dir(tiny_checkpoint)
    rng = random.Random(0)
    # 7 requests (bucket 8) finishing at different steps: batches of 7..1 run in buckets 8, 4,
    # 2, 1 with padding rows; prompt lengths cross block boundaries (block size 16).
    prompts = [([rng.randrange(20, 400) for _ in range(rng.randint(3, 40))], 6 + 3 * i)
               for i in range(7)]  # fmt: skip
    outputs = {}
    for graphs in (False, True):
        model = load_decoder(tiny_checkpoint, cfg, torch.float32, "cuda")
        runner = ModelRunner(cfg, model, 16 << 20, 16, torch.float32, "cuda",
                             cuda_graphs=graphs, max_batch=8)  # fmt: skip
        engine = Engine(cfg, runner, SchedulerConfig(max_num_seqs=8, max_batch_tokens=512))
        outputs[graphs] = asyncio.run(_greedy(engine, prompts))
        if graphs:
            assert runner.graphs is not None
            assert sorted(runner.graphs.graphs) == [1, 2, 4, 8]
            assert runner.graphs.num_replays >= 15  # most steps were decode-only replays
        else:
            assert runner.graphs is None
    assert [len(o) for o in outputs[True]] == [n for _, n in prompts]
    assert outputs[True] == outputs[False]
