"""How an engine is built from its settings: weights, KV cache, max_model_len, warm-up.

One way for every place that runs the engine: the language service (`epd language`), the
colocated pipeline (`epd generate`, the colocated baseline of `epd bench`) and the benchmarks.
With `--tensor-parallel-size N` this process is rank 0 and the builder starts ranks 1..N-1
(`parallel.workers`), each loading its own part of the checkpoint while rank 0 loads its own.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from dataclasses import dataclass, field

import torch

from common.config import ModelConfig
from common.contract import SamplingParams
from common.cores import CoreShare
from common.dtypes import DTYPES
from common.tokenizer import ChatTokenizer
from common.torch_thread import add_threads_argument, set_torch_threads
from services.language.engine.engine import Engine
from services.language.engine.grammar import GrammarCompiler
from services.language.engine.memory import (
    DEFAULT_CPU_KV_BYTES,
    peak_forward,
    profile_kv_bytes,
    resolve_max_model_len,
)
from services.language.engine.model_runner import ModelRunner
from services.language.engine.scheduler import SchedulerConfig
from services.language.metrics import LanguageMetrics
from services.language.model import Qwen3MoeForCausalLM
from services.language.parallel.config import (
    ParallelConfig,
    add_parallel_arguments,
    parallel_config_from_args,
)
from services.language.parallel.layers import ParallelDecoder
from services.language.parallel.plan import ShardPlan, check_splits
from services.language.parallel.report import RankMemory, log_ranks
from services.language.parallel.workers import Workers
from services.language.weights import load_decoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """What builds one engine: the service's and the colocated pipeline's alike."""

    model: str
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    dtype: str = "float32"
    device: str = "cpu"
    # Bytes of KV cache; None = 1 GiB on CPU, sized from free memory on CUDA.
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.9  # CUDA, when kv_cache_bytes is None (vLLM's meaning)
    max_model_len: int | None = None  # None = min(checkpoint context, KV cache capacity)
    block_size: int = 16
    cuda_graphs: bool = True  # decode steps through CUDA graphs (CUDA + Triton kernels only)
    # Image tensor bytes the engine holds at once for requests not yet finished.
    max_image_bytes_held: int = 2 << 30
    num_threads: int | None = None  # torch threads; None = torch's default (one per core)
    share_cores: str | None = None  # PATH,SLOT,CORES of `epd up`'s core ledger (common.cores)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine's flags, shared by `epd language` and `epd generate`."""
    d = EngineConfig("")
    g = parser.add_argument_group("engine")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype)
    g.add_argument("--device", default=d.device, help="cpu or cuda[:N]")
    g.add_argument(
        "--kv-cache-bytes",
        type=int,
        default=None,
        help="bytes of KV cache to preallocate, per rank with --tensor-parallel-size (default: "
        "1 GiB on CPU; on CUDA, sized from --gpu-memory-utilization); wins over "
        "--gpu-memory-utilization",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=d.gpu_memory_utilization,
        help="CUDA: fraction of the device's memory this replica may use (weights, "
        "activations and KV cache), as in vLLM",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="tokens one sequence may hold, prompt and output (default: the checkpoint's "
        "context, capped by what the KV cache holds)",
    )
    g.add_argument(
        "--block-size",
        type=int,
        default=d.block_size,
        help="tokens per KV block (the prefix-cache granularity)",
    )
    g.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=d.cuda_graphs,
        help="replay decode steps from CUDA graphs captured per batch size (CUDA with the "
        "Triton kernels only; $EPD_CUDA_GRAPHS=0|1 overrides)",
    )
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=SchedulerConfig.max_num_seqs,
        help="requests decoded at once at most",
    )
    g.add_argument(
        "--max-batch-tokens",
        type=int,
        default=SchedulerConfig.max_batch_tokens,
        help="tokens per forward at most (longer prompts are prefilled in chunks)",
    )
    g.add_argument(
        "--prefill-budget-with-decodes",
        type=int,
        default=SchedulerConfig.prefill_budget_with_decodes,
        help="prompt tokens per step while requests are decoding (bounds how long arriving "
        "prompts stall them; default: up to --max-batch-tokens)",
    )
    g.add_argument(
        "--max-waiting",
        type=int,
        default=SchedulerConfig.max_waiting,
        help="queued requests beyond which new ones get RESOURCE_EXHAUSTED",
    )
    add_threads_argument(g)
    add_parallel_arguments(g)
    g.add_argument(
        "--max-image-bytes-held",
        type=int,
        default=d.max_image_bytes_held,
        help="image tensor bytes held at once for unfinished requests; beyond it new image "
        "requests get RESOURCE_EXHAUSTED before their images are pulled",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_batch_tokens=args.max_batch_tokens,
            max_waiting=args.max_waiting,
            prefill_budget_with_decodes=args.prefill_budget_with_decodes,
        ),
        dtype=args.dtype,
        device=args.device,
        kv_cache_bytes=args.kv_cache_bytes,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        cuda_graphs=args.cuda_graphs,
        max_image_bytes_held=args.max_image_bytes_held,
        num_threads=args.num_threads,
        share_cores=args.share_cores,
        parallel=parallel_config_from_args(args),
    )


def build_engine(cfg: EngineConfig, metrics: LanguageMetrics | None = None) -> Engine:
    """Weights, KV cache and `max_model_len` (logged), on the calling (torch) thread."""
    model_cfg = ModelConfig.from_dir(cfg.model)
    dtype = DTYPES[cfg.dtype]
    device = torch.device(cfg.device)
    p = cfg.parallel
    threads = cfg.num_threads
    if p.enabled and threads is None and device.type == "cpu":
        threads = max(1, len(os.sched_getaffinity(0)) // p.tensor_parallel_size)  # cores shared
    set_torch_threads(threads)
    workers, decoder, kv_heads = None, None, model_cfg.text.num_key_value_heads
    if p.enabled:
        check_splits(model_cfg.text, p.tensor_parallel_size, p.enable_expert_parallel)
        workers = Workers.start(cfg.model, cfg.dtype, cfg.device, p, threads)
        plan = ShardPlan.of(model_cfg.text, 0, p.tensor_parallel_size, p.enable_expert_parallel)
        decoder, kv_heads = ParallelDecoder(plan, workers.comm), plan.local_kv_heads
    try:
        model = load_decoder(cfg.model, model_cfg, dtype, cfg.device, decoder)
        if workers is not None:
            log_ranks([RankMemory.of(0, model, device), *workers.loaded()])
        kv_bytes = cfg.kv_cache_bytes
        if kv_bytes is None:
            kv_bytes = _kv_bytes(model, model_cfg, cfg, dtype, kv_heads, workers)
        s = cfg.scheduler
        runner = ModelRunner(
            model_cfg, model, kv_bytes, cfg.block_size, dtype, cfg.device,
            cuda_graphs=cfg.cuda_graphs, max_batch=min(s.max_num_seqs, s.max_batch_tokens),
            kv_heads=kv_heads, workers=workers,
        )  # fmt: skip
    except BaseException:
        if workers is not None:
            workers.kill()
            workers.comm.close()
        raise
    context = model_cfg.text.max_position_embeddings
    max_len = resolve_max_model_len(context, cfg.max_model_len, runner.capacity_tokens)
    log.info(
        "max_model_len %d tokens (checkpoint context %d, --max-model-len %s, KV cache %d tokens)",
        max_len, context, cfg.max_model_len, runner.capacity_tokens,
    )  # fmt: skip
    eos = frozenset(ChatTokenizer(cfg.model).eos_token_ids or model_cfg.eos_token_ids)
    grammars = GrammarCompiler.from_model_dir(cfg.model, model_cfg.text.vocab_size, sorted(eos))
    cores = CoreShare.from_spec(cfg.share_cores, set_torch_threads) if cfg.share_cores else None
    return Engine(model_cfg, runner, s, eos, metrics, max_len, cfg.max_image_bytes_held,
                  grammars, cores)  # fmt: skip


def _kv_bytes(
    model: Qwen3MoeForCausalLM,
    model_cfg: ModelConfig,
    cfg: EngineConfig,
    dtype: torch.dtype,
    kv_heads: int,
    workers: Workers | None,
) -> int:
    """KV cache bytes per rank when not given: 1 GiB on CPU; on CUDA what the device has left
    after the largest forward (with tensor parallelism, the least any rank has left)."""
    device = torch.device(cfg.device)
    if device.type != "cuda":
        return DEFAULT_CPU_KV_BYTES
    s, t = cfg.scheduler, model_cfg.text
    logits = min(s.max_batch_tokens, s.max_num_seqs)

    def own() -> int:
        run = lambda: peak_forward(model, t, s.max_batch_tokens, logits, kv_heads, dtype, device)  # noqa: E731
        return profile_kv_bytes(device, cfg.gpu_memory_utilization, run)

    if workers is None:
        return own()
    return workers.profile(cfg.gpu_memory_utilization, s.max_batch_tokens, logits, own)


async def warm_up(engine: Engine) -> None:
    """One tiny request through the whole engine before reporting SERVING."""
    started = asyncio.get_running_loop().time()
    async for _ in engine.generate([0, 1, 2], SamplingParams(max_tokens=2, ignore_eos=True)):
        pass
    log.info("warm-up done in %.2f s", asyncio.get_running_loop().time() - started)
