"""`epd encoder`: the encoder service (gRPC `Encoder` + `TensorStore`, health, reflection,
/metrics)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import socket
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from common.config import ModelConfig
from common.contract import PreprocessConfig, VideoPreprocessConfig
from common.contract.images import add_image_limit_arguments, image_limits_from_args
from common.contract.videos import add_video_limit_arguments, video_limits_from_args
from common.cores import CoreShare
from common.dtypes import DTYPES
from common.grpc_bootstrap import GrpcServer, ServerConfig, add_server_arguments, server_config
from common.lifecycle import never_fails, serve_service, start_service, stop_service
from common.rpc import encoder_pb2, encoder_pb2_grpc, tensor_pb2
from common.torch_thread import add_threads_argument, run_on_torch_thread, set_torch_threads
from common.transfer import Producer, TransferConfig
from common.transfer.config import BACKEND_CHOICES
from services.encoder.encoder import MIB, Encoder, EncoderConfig
from services.encoder.metrics import EncoderMetrics
from services.encoder.servicer import EncoderServicer
from services.encoder.weights import load_vision_tower

log = logging.getLogger("epd.encoder")
DEFAULT_PORT = 50051
# Images per forward on CPU: as many as are queued, up to 32. Small batches let each image
# prefill as soon as it is encoded, so a cohort of requests starts decoding at different steps
# and every decode step runs beside a tower forward or a prompt's prefill; one forward of the
# whole queue lets the cohort prefill, then decode with the tower idle. `epd up` on 2 cores,
# small checkpoint, one 224x224 image per request, two interleaved rounds each: concurrency 32,
# 4 vs 32 images, 413-418 vs 395-439 tok/s, TPOT p50 51-63 vs 39-41 ms, TTFT p50 0.5-0.9 vs
# 1.3-1.5 s; concurrency 8, 280-298 vs 296-307 tok/s, TPOT p50 20.3-21.0 vs 19.0-19.3 ms.
# (`--max-batch-images 4` trades that TPOT for the TTFT.)
CPU_BATCH_IMAGES = 32
# How long an idle CPU tower waits for more images: not at all. Batching buys a CPU forward
# little (one image 17 ms, 4 took 3.4x, 32 23.7x), so a wait mostly delays the image that came
# first (5 ms on every encode at concurrency 1); images that arrive while a forward runs still
# batch.
CPU_MAX_WAIT_MS = 0.0
_ALL_INTERFACES = ("", "0.0.0.0", "::", "[::]")


@dataclass(frozen=True)
class EncoderServiceConfig:
    model: str
    server: ServerConfig
    transfer: TransferConfig
    encoder: EncoderConfig
    dtype: str = "float32"
    device: str = "cpu"
    # Host put in gRPC-backend handles ("host:port" of our TensorStore); None = the listen host,
    # or this machine's hostname when listening on all interfaces.
    advertise_host: str | None = None
    # On SIGTERM, once Encode calls are answered, how long consumers may still pull published
    # tensors (over any transport) before the server stops and the pool is freed, in seconds.
    handoff_s: float = 5.0
    num_threads: int | None = None  # torch threads; None = torch's default (one per core)
    share_cores: str | None = None  # PATH,SLOT,CORES of `epd up`'s core ledger (common.cores)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Qwen3-VL(-MoE) checkpoint directory")
    add_server_arguments(parser, DEFAULT_PORT)
    add_image_limit_arguments(parser)
    add_video_limit_arguments(parser)
    d = EncoderConfig()
    g = parser.add_argument_group("encoder")
    g.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=EncoderServiceConfig.dtype,
        help="vision tower and wire tensor dtype",
    )
    g.add_argument("--device", default=EncoderServiceConfig.device, help="cpu or cuda[:N]")
    add_threads_argument(g)
    g.add_argument(
        "--max-batch-patches",
        type=int,
        default=d.max_batch_patches,
        help="patches per tower forward at most (a larger image runs alone)",
    )
    g.add_argument(
        "--max-batch-images",
        type=int,
        default=None,
        help=f"images per tower forward at most (1 = no batching); default {d.max_batch_images} "
        f"on CUDA, {CPU_BATCH_IMAGES} on CPU: every image queued behind a running forward joins "
        "the next one, so requests that arrive together prefill and decode together, and their "
        "decode steps do not share the cores with the tower (lower TPOT); small batches prefill "
        "the first images sooner (lower TTFT)",
    )
    g.add_argument(
        "--max-wait-ms",
        type=float,
        default=None,
        help=f"how long an idle tower waits for more images to batch; default "
        f"{d.max_wait_s * 1000:g} on CUDA, {CPU_MAX_WAIT_MS:g} on CPU (where batching gains "
        "little: images arriving during a forward still join the next)",
    )
    g.add_argument(
        "--max-queue-images",
        type=int,
        default=d.max_queue_images,
        help="images waiting beyond which calls get RESOURCE_EXHAUSTED",
    )
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=64 * MIB,
        help="gRPC message size limit: all images of one call together",
    )
    g.add_argument(
        "--cache-bytes",
        type=int,
        default=d.cache_bytes,
        help="bytes of encoder outputs to cache by image hash (0 = off)",
    )
    g.add_argument(
        "--preprocess-threads",
        type=int,
        default=d.preprocess_threads,
        help="threads decoding and resizing images",
    )
    t = parser.add_argument_group("transfer")
    t.add_argument(
        "--transport",
        choices=BACKEND_CHOICES,
        default="auto",
        help="how consumers pull tensors. auto: shm for a consumer on this host; for another "
        "host nixl when both have RDMA, or for tensors up to 4 MiB with --nixl-progress-thread "
        "(UCX over TCP is slower than the grpc stream otherwise), else grpc",
    )
    t.add_argument(
        "--pool-bytes",
        type=int,
        default=TransferConfig.pool_bytes,
        help="transfer pool size, preallocated",
    )
    t.add_argument(
        "--lease",
        type=float,
        default=TransferConfig.lease_s,
        help="seconds an unacknowledged tensor stays valid",
    )
    t.add_argument(
        "--shm-prefix",
        default=TransferConfig.shm_prefix,
        help="name prefix of this encoder's /dev/shm segment (starts with 'epd-')",
    )
    t.add_argument(
        "--nixl-progress-thread",
        action=argparse.BooleanOptionalAction,
        default=TransferConfig.nixl_progress_thread,
        help="run NIXL's UCX progress thread: needed for speed over TCP (READs there need the "
        "producer's progress), costs a busy core; CMA and RDMA READs do not need it",
    )
    t.add_argument(
        "--ucx-tls",
        default=None,
        help="UCX transports NIXL may use (UCX_TLS), e.g. 'rc,sm,self' or 'tcp'; default: the "
        "environment's UCX_TLS, else all",
    )
    t.add_argument(
        "--ucx-net-devices",
        default=None,
        help="network devices UCX may use (UCX_NET_DEVICES), e.g. 'mlx5_0:1,eth0'; default all",
    )
    t.add_argument(
        "--advertise-host",
        default=None,
        help="host consumers dial for the grpc transport (e.g. the pod IP)",
    )


def config_from_args(args: argparse.Namespace) -> EncoderServiceConfig:
    server = dataclasses.replace(server_config(args), max_message_bytes=args.max_request_bytes)
    return EncoderServiceConfig(
        model=args.model,
        server=server,
        transfer=TransferConfig(
            backend=args.transport,
            pool_bytes=args.pool_bytes,
            lease_s=args.lease,
            shm_prefix=args.shm_prefix,
            nixl_progress_thread=args.nixl_progress_thread,
            ucx_tls=args.ucx_tls,
            ucx_net_devices=args.ucx_net_devices,
        ),
        encoder=EncoderConfig(
            max_batch_patches=args.max_batch_patches,
            max_batch_images=_batch_images(args),
            max_wait_s=_max_wait_ms(args) / 1000,
            max_queue_images=args.max_queue_images,
            limits=image_limits_from_args(args),
            video_limits=video_limits_from_args(args),
            cache_bytes=args.cache_bytes,
            preprocess_threads=args.preprocess_threads,
        ),
        dtype=args.dtype,
        device=args.device,
        advertise_host=args.advertise_host,
        num_threads=args.num_threads,
        share_cores=args.share_cores,
    )


@dataclass
class EncoderService:
    """A running encoder service (what `serve` runs; tests drive it directly)."""

    cfg: EncoderServiceConfig
    server: GrpcServer
    servicer: EncoderServicer
    producer: Producer
    metrics: EncoderMetrics
    encoder: Encoder | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def load(self) -> None:
        """Load the weights off the event loop, warm up, then report SERVING."""
        cfg = self.cfg
        started = time.perf_counter()
        await run_on_torch_thread(set_torch_threads, cfg.num_threads)
        tower = await run_on_torch_thread(
            load_vision_tower,
            cfg.model,
            ModelConfig.from_dir(cfg.model),
            DTYPES[cfg.dtype],
            cfg.device,
        )
        log.info("vision tower loaded in %.2f s", time.perf_counter() - started)
        pixels = cfg.encoder.limits.max_image_pixels
        pre = PreprocessConfig.from_dir(cfg.model, max_input_pixels=pixels)
        video = VideoPreprocessConfig.from_dir(cfg.model)
        cores = None
        if cfg.share_cores:
            cores = CoreShare.from_spec(cfg.share_cores, set_torch_threads)
        encoder = Encoder(tower, pre, self.producer, cfg.encoder, self.metrics, cfg.device, video,
                          cores)  # fmt: skip
        await encoder.start()
        self.encoder = encoder
        await encoder.warm_up()
        self.servicer.encoder = encoder
        await self.server.set_serving()

    async def stop(self, grace: float | None = None) -> None:
        """Stop at once (no drain, no hand-off period): for tests and embedding."""
        await stop_service(self, grace)

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.registry

    async def drain(self, grace: float) -> None:
        """SIGTERM, before the server stops: refuse new Encode calls, let the running ones
        answer, then keep TensorStore up while consumers pull and acknowledge what was
        published (every transport: gRPC-transport consumers need the server itself)."""
        if not await self.servicer.drain(grace):
            log.warning("Encode calls still running after %.0f s; stopping anyway", grace)
        end = time.monotonic() + self.cfg.handoff_s
        while self.producer.bytes_in_use > 0 and time.monotonic() < end:
            await asyncio.sleep(0.05)
        if self.producer.bytes_in_use:
            log.warning("%d tensors never pulled within the %.0f s hand-off; dropping them",
                        len(self.producer.pool), self.cfg.handoff_s)  # fmt: skip

    async def close(self) -> None:
        """After the server stopped: free the encoder and the pool."""
        if self.encoder is not None:
            await self.encoder.stop()
        self.producer.close()

    async def failed(self) -> str:
        return await never_fails()


def create(cfg: EncoderServiceConfig) -> EncoderService:
    """The role, not yet listening (`start_service` listens with health NOT_SERVING; Encode
    answers UNAVAILABLE until `load` is done)."""
    names = [
        encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name,
        tensor_pb2.DESCRIPTOR.services_by_name["TensorStore"].full_name,
    ]
    server = GrpcServer(cfg.server, names)
    host = cfg.advertise_host or cfg.server.host
    if host in _ALL_INTERFACES:
        host = socket.gethostname()
    producer = Producer(cfg.transfer, store_address=f"{host}:{server.port}")
    servicer = EncoderServicer(None)
    encoder_pb2_grpc.add_EncoderServicer_to_server(servicer, server.server)
    producer.servicer().add_to_server(server.server)
    return EncoderService(cfg, server, servicer, producer, EncoderMetrics())


async def start(cfg: EncoderServiceConfig) -> EncoderService:
    service = create(cfg)
    await start_service(service)
    return service


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    return asyncio.run(serve_service(lambda: create(cfg)))


def _batch_images(args: argparse.Namespace) -> int:
    if args.max_batch_images is not None:
        return int(args.max_batch_images)
    cuda = str(args.device).startswith("cuda")
    return EncoderConfig.max_batch_images if cuda else CPU_BATCH_IMAGES


def _max_wait_ms(args: argparse.Namespace) -> float:
    if args.max_wait_ms is not None:
        return float(args.max_wait_ms)
    cuda = str(args.device).startswith("cuda")
    return EncoderConfig.max_wait_s * 1000 if cuda else CPU_MAX_WAIT_MS
