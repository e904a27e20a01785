"""Tensor parallelism on CUDA (NCCL, one GPU per rank, the Triton kernels on the sharded shapes):
the same greedy tokens as one GPU, with the experts split by width and whole per rank, and the KV
cache sized from the least free memory of any rank. Needs two GPUs; skipped with fewer."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.gpu.conftest import requires_cuda

pytestmark = [
    pytest.mark.gpu,
    requires_cuda,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs"),
]
PROMPTS = [[100 + i for i in range(n)] for n in (5, 40, 17, 90)]


def greedy(engine, max_tokens: int = 12) -> list[list[int]]:
    from common.contract import SamplingParams

    async def one(ids: list[int]) -> list[int]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return [e.sample.token async for e in engine.generate(ids, params) if e.sample]

    async def all_of_them() -> list[list[int]]:
        await engine.start()
        try:
            return list(await asyncio.gather(*(one(p) for p in PROMPTS)))
        finally:
            await engine.stop()

    return asyncio.run(all_of_them())


@pytest.mark.parametrize("ep", [False, True], ids=["tp2", "tp2-ep"])
def test_two_gpus_give_one_gpus_tokens(tiny_checkpoint, ep) -> None:
    from services.language.engine.builder import EngineConfig, build_engine
    from services.language.engine.scheduler import SchedulerConfig
    from services.language.parallel.config import ParallelConfig

    def engine(tp: int, **kw):
        return build_engine(EngineConfig(
            str(tiny_checkpoint), device="cuda", cuda_graphs=False,
            scheduler=SchedulerConfig(max_batch_tokens=32),  # chunked prefill too
            parallel=ParallelConfig(tensor_parallel_size=tp, enable_expert_parallel=ep), **kw,
        ))  # fmt: skip

    single = engine(1, kv_cache_bytes=64 << 20)
    want = greedy(single)
    del single
    torch.cuda.empty_cache()
    split = engine(2, gpu_memory_utilization=0.3)  # KV sized on both ranks, the least taken
    try:
        assert split.runner.storage.k.shape[2] == 1  # 2 KV heads over 2 ranks: one each
        assert greedy(split) == want
    finally:
        split.close()
