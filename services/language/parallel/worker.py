"""A tensor-parallel worker: ranks 1..N-1, each its own process (spawned by `Workers`).

It holds its part of the decoder and of the KV cache (its KV heads) and runs the forward of
every step rank 0 announces; it schedules nothing and keeps no request state. Commands come over
its pipe from rank 0 (a blocking read: an idle replica waits here without any timeout), the step
data over the group's broadcasts (bounded). Rank 0 gone (the pipe closes, a collective fails, or
the parent dies: PR_SET_PDEATHSIG) ends the worker, so none outlives its replica.

    rank 0 -> worker: ("kv", total_blocks, block_size) | ("profile", utilization, tokens,
                      logits) | ("step",) | ("stop",)
    worker -> rank 0: ("hello",) | ("loaded", RankMemory) | ("profile", kv_bytes)
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from common.config import ModelConfig
from common.dtypes import DTYPES
from common.torch_thread import set_torch_threads
from services.language.engine.forward_batch import KVStorage, forward_step
from services.language.engine.memory import peak_forward, profile_kv_bytes
from services.language.parallel.comm import Comm
from services.language.parallel.config import ParallelConfig
from services.language.parallel.layers import ParallelDecoder
from services.language.parallel.plan import ShardPlan
from services.language.parallel.report import RankMemory
from services.language.parallel.step import receive_step
from services.language.weights import load_decoder

log = logging.getLogger("epd.language.worker")
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs (pickled to the spawned process)."""

    model: str
    dtype: str
    device: str  # rank 0's; rank r takes the r-th device after it on CUDA
    parallel: ParallelConfig
    num_threads: int | None
    port: int  # rank 0's rendezvous store


def rank_device(device: str, rank: int) -> torch.device:
    """cpu for every rank; cuda:K -> cuda:K+rank (rank r on its own GPU)."""
    d = torch.device(device)
    if d.type != "cuda":
        return d
    return torch.device("cuda", (d.index or 0) + rank)


def main(spec: WorkerSpec, rank: int, conn: Connection) -> None:
    """The worker process's entry point; exits 0 after "stop", 1 on any failure."""
    _die_with_parent()
    signal.signal(
        signal.SIGINT, signal.SIG_IGN
    )  # Ctrl-C reaches the process group: rank 0 stops us
    fmt = f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt)
    try:
        _serve(spec, rank, conn)
    except EOFError:
        log.info("rank 0 is gone; exiting")
    except BaseException:
        log.exception("rank %d failed", rank)
        logging.shutdown()
        # No normal interpreter exit: a torn process group (a dead peer) may hang its teardown.
        os._exit(1)


def _serve(spec: WorkerSpec, rank: int, conn: Connection) -> None:
    set_torch_threads(spec.num_threads)
    device = rank_device(spec.device, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    conn.send(("hello",))
    p = spec.parallel
    comm = Comm(rank, p.tensor_parallel_size, device, p.timeout_s, port=spec.port)
    cfg = ModelConfig.from_dir(spec.model)
    dtype = DTYPES[spec.dtype]
    plan = ShardPlan.of(cfg.text, rank, p.tensor_parallel_size, p.enable_expert_parallel)
    model = load_decoder(spec.model, cfg, dtype, device, ParallelDecoder(plan, comm))
    conn.send(("loaded", RankMemory.of(rank, model, device)))
    t = cfg.text
    storage: KVStorage | None = None
    block_size = 0
    while True:
        msg = conn.recv()  # EOFError once rank 0 closed its end
        if msg[0] == "step":
            assert storage is not None  # "kv" comes first
            with torch.inference_mode():
                forward_step(model, storage, block_size, receive_step(comm, t.hidden_size, dtype))
        elif msg[0] == "kv":
            _, blocks, block_size = msg
            storage = KVStorage(t.num_hidden_layers, blocks, block_size, plan.local_kv_heads,
                                t.head_dim, dtype, device)  # fmt: skip
        elif msg[0] == "profile":
            _, utilization, tokens, logits = msg
            run = functools.partial(peak_forward, model, t, tokens, logits,
                                    plan.local_kv_heads, dtype, device)  # fmt: skip
            conn.send(("profile", profile_kv_bytes(device, utilization, run)))
        elif msg[0] == "stop":
            comm.close()
            return
        else:
            raise ValueError(f"unknown command {msg[0]!r}")


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (a rank 0 killed -9 leaves no worker)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
