"""The engine on CUDA: every sampling tensor on the logits' device (penalties, bans and seeded
draws in one batch, the same tokens as on the CPU), and the KV cache sized from the device's
free memory (`--gpu-memory-utilization`). Engine modules are imported inside the tests (see
test_kernels_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.conftest import requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]


def test_penalties_and_bans_on_cuda_logits_match_the_cpu() -> None:
    from common.contract import SamplingParams
    from services.language.engine.sampler import SampleInput, sample_rows

    torch.manual_seed(0)
    logits = torch.randn(4, 512)
    rows = [
        SamplingParams(repetition_penalty=1.4),
        SamplingParams(presence_penalty=0.8, frequency_penalty=1.2),
        SamplingParams(min_tokens=5),
        SamplingParams(),
    ]
    inputs = [SampleInput(p, None, [1, 2, 3, 7], [7, 7, 9], frozenset({int(logits[i].argmax())}))
              for i, p in enumerate(rows)]  # fmt: skip
    cpu = [s.token for s in sample_rows(logits, inputs)]
    cuda = [s.token for s in sample_rows(logits.cuda(), inputs)]
    assert cuda == cpu


def test_kv_cache_is_sized_from_free_device_memory(tiny_checkpoint) -> None:
    from services.language.engine.builder import EngineConfig, build_engine

    free, total = torch.cuda.mem_get_info()
    engine = build_engine(EngineConfig(str(tiny_checkpoint), device="cuda",
                                       gpu_memory_utilization=0.3, cuda_graphs=False))  # fmt: skip
    kv_bytes = engine.runner.storage.k.nbytes + engine.runner.storage.v.nbytes
    # 30% of the device less what was in use: within what was free, and most of that share.
    assert kv_bytes <= free and kv_bytes > 0.3 * total - (total - free) - (1 << 30)
    assert engine.max_model_len == min(engine.cfg.text.max_position_embeddings,
                                       engine.runner.capacity_tokens)  # fmt: skip
