"""`epd language`: the language service (gRPC `Language`, health, reflection, /metrics)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import dataclass

from common.config import ModelConfig
from common.dtypes import DTYPES
from common.grpc_bootstrap import GrpcServer, ServerConfig, add_server_arguments, server_config
from common.rpc import language_pb2, language_pb2_grpc
from common.tls import ClientTLS, add_client_tls_arguments, client_tls_from_args
from common.tokenizer import ChatTokenizer
from common.torch_thread import run_on_torch_thread
from common.transfer import Consumer, TransferConfig
from services.language.engine.engine import Engine
from services.language.engine.model_runner import ModelRunner
from services.language.engine.request import SamplingParams
from services.language.engine.scheduler import SchedulerConfig
from services.language.metrics import LanguageMetrics
from services.language.servicer import LanguageServicer
from services.language.weights import load_decoder

log = logging.getLogger("epd.language")
DEFAULT_PORT = 50061


@dataclass(frozen=True)
class LanguageConfig:
    model: str
    server: ServerConfig
    scheduler: SchedulerConfig
    dtype: str = "float32"
    device: str = "cpu"
    kv_cache_bytes: int = 1 << 30
    block_size: int = 16
    pull_timeout_s: float = 30.0
    cuda_graphs: bool = True  # decode steps through CUDA graphs (CUDA + Triton kernels only)
    encoder_tls: ClientTLS | None = None  # TLS to encoders' TensorStore (grpc transport)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (VL or text-only)")
    add_server_arguments(parser, DEFAULT_PORT)
    g = parser.add_argument_group("engine")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=LanguageConfig.dtype)
    g.add_argument("--device", default=LanguageConfig.device, help="cpu or cuda[:N]")
    g.add_argument(
        "--kv-cache-bytes",
        type=int,
        default=LanguageConfig.kv_cache_bytes,
        help="bytes of KV cache to preallocate (default: 1 GiB)",
    )
    g.add_argument(
        "--block-size",
        type=int,
        default=LanguageConfig.block_size,
        help="tokens per KV block (the prefix-cache granularity)",
    )
    g.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=LanguageConfig.cuda_graphs,
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
        "--max-waiting",
        type=int,
        default=SchedulerConfig.max_waiting,
        help="queued requests beyond which new ones get RESOURCE_EXHAUSTED",
    )
    g.add_argument(
        "--pull-timeout",
        type=float,
        default=LanguageConfig.pull_timeout_s,
        help="seconds allowed to pull one request's images",
    )
    add_client_tls_arguments(parser, "encoder-", "encoders (TensorStore, grpc transport)")


def run(args: argparse.Namespace) -> int:
    cfg = LanguageConfig(
        model=args.model,
        server=server_config(args),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_batch_tokens=args.max_batch_tokens,
            max_waiting=args.max_waiting,
        ),
        dtype=args.dtype,
        device=args.device,
        kv_cache_bytes=args.kv_cache_bytes,
        block_size=args.block_size,
        pull_timeout_s=args.pull_timeout,
        cuda_graphs=args.cuda_graphs,
        encoder_tls=client_tls_from_args(args, "encoder-"),
    )
    asyncio.run(serve(cfg))
    return 0


@dataclass
class LanguageService:
    """A running language service (what `serve` runs; tests drive it directly)."""

    server: GrpcServer
    engine: Engine
    consumer: Consumer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def stop(self, grace: float | None = None) -> None:
        await self.server.stop(grace)
        await self.engine.stop()
        self.consumer.close()


async def start(cfg: LanguageConfig) -> LanguageService:
    """Listen (health NOT_SERVING), load the model, warm up, then report SERVING."""
    service = language_pb2.DESCRIPTOR.services_by_name["Language"].full_name
    server = GrpcServer(cfg.server, [service])
    metrics = LanguageMetrics()
    consumer = Consumer(TransferConfig(client_tls=cfg.encoder_tls))
    servicer = LanguageServicer(None, consumer, cfg.pull_timeout_s)
    language_pb2_grpc.add_LanguageServicer_to_server(servicer, server.server)
    # Listen while the weights load, so probes see a live (not yet serving) process.
    await server.start(metrics.registry)
    engine = await run_on_torch_thread(build_engine, cfg, metrics)
    await engine.start()
    await warm_up(engine)
    servicer.engine = engine
    await server.set_serving()
    return LanguageService(server, engine, consumer)


async def serve(cfg: LanguageConfig) -> None:
    service = await start(cfg)

    async def shutdown() -> None:
        await service.engine.stop()
        service.consumer.close()

    await service.server.serve_until_signal(shutdown)


def build_engine(cfg: LanguageConfig, metrics: LanguageMetrics) -> Engine:
    model_cfg = ModelConfig.from_dir(cfg.model)
    dtype = DTYPES[cfg.dtype]
    model = load_decoder(cfg.model, model_cfg, dtype, cfg.device)
    runner = ModelRunner(
        model_cfg, model, cfg.kv_cache_bytes, cfg.block_size, dtype, cfg.device,
        cuda_graphs=cfg.cuda_graphs,
        max_batch=min(cfg.scheduler.max_num_seqs, cfg.scheduler.max_batch_tokens),
    )  # fmt: skip
    eos = frozenset(ChatTokenizer(cfg.model).eos_token_ids or model_cfg.eos_token_ids)
    return Engine(model_cfg, runner, cfg.scheduler, eos, metrics)


async def warm_up(engine: Engine) -> None:
    """One tiny request through the whole engine before reporting SERVING."""
    started = asyncio.get_running_loop().time()
    async for _ in engine.generate([0, 1, 2], SamplingParams(max_tokens=2, ignore_eos=True)):
        pass
    log.info("warm-up done in %.2f s", asyncio.get_running_loop().time() - started)
