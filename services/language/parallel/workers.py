"""Rank 0's side of tensor parallelism: it spawns ranks 1..N-1, joins the group with them, and
per step tells them a step follows and broadcasts its inputs.

Start-up: rank 0 opens the rendezvous store, spawns the workers (`multiprocessing` spawn: a
fresh interpreter each, no forked torch state), waits for each to say hello, joins the group
(NCCL on CUDA, gloo on CPU), loads its own part while they load theirs, and waits for each to
report its memory. Every wait is bounded and checks that the workers are alive, so a worker that
dies while loading fails the start within a poll, not at the start-up timeout.

Failure: any worker exiting is seen by a watcher thread at once (`watch`), and a worker that
hangs by the collective timeout of the next step (`explain` says which). Either ends the
replica: it cannot run a forward without all its ranks.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import torch

from services.language.engine.forward_batch import StepInputs
from services.language.parallel.comm import Comm, master_store
from services.language.parallel.config import ParallelConfig
from services.language.parallel.report import RankMemory
from services.language.parallel.step import send_step
from services.language.parallel.worker import WorkerSpec, main

log = logging.getLogger(__name__)

POLL_S = 0.1


class WorkerLost(RuntimeError):
    """A worker exited, hung past the timeout, or broke the protocol."""


class Workers:
    def __init__(
        self, procs: list[BaseProcess], conns: list[Connection], comm: Comm, cfg: ParallelConfig
    ) -> None:
        self.procs, self.conns, self.comm, self.cfg = procs, conns, comm, cfg
        self._closing = threading.Event()
        self.reports: list[RankMemory] = []  # ranks 1..N-1, once loaded
        self._watcher: threading.Thread | None = None
        self._on_lost: Callable[[str], None] = lambda reason: None

    @classmethod
    def start(
        cls, model: str, dtype: str, device: str, cfg: ParallelConfig, num_threads: int | None
    ) -> Workers:
        """Spawn the workers and join the group with them (rank 0 on `device`)."""
        world = cfg.tensor_parallel_size
        store = master_store(world, cfg.startup_timeout_s)
        spec = WorkerSpec(model, dtype, device, cfg, num_threads, store.port)
        ctx = mp.get_context("spawn")
        procs: list[BaseProcess] = []
        conns: list[Connection] = []
        try:
            for rank in range(1, world):
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(target=main, args=(spec, rank, theirs), daemon=True,
                                   name=f"epd-tp-rank{rank}")  # fmt: skip
                proc.start()
                theirs.close()
                procs.append(proc)
                conns.append(ours)
            log.info("tensor parallel: spawned ranks 1..%d (pids %s)", world - 1,
                     [p.pid for p in procs])  # fmt: skip
            expect_all(procs, conns, "hello", cfg.startup_timeout_s)
            comm = Comm(0, world, torch.device(device), cfg.timeout_s, store=store)
        except BaseException:
            _kill(procs)
            raise
        return cls(procs, conns, comm, cfg)

    def loaded(self) -> list[RankMemory]:
        """After rank 0 loaded its own part: every worker's report once it has loaded."""
        self.reports = self._expect_all("loaded", self.cfg.startup_timeout_s)
        return self.reports

    def _expect_all(self, kind: str, timeout_s: float) -> list[Any]:
        return expect_all(self.procs, self.conns, kind, timeout_s)

    def profile(self, utilization: float, tokens: int, logits: int, own: Callable[[], int]) -> int:
        """CUDA: KV bytes every rank can afford (the least of theirs): each runs the largest
        forward (together: it has collectives) and sizes its cache from what is left."""
        self._send(("profile", utilization, tokens, logits))
        mine = own()
        return min([mine, *self._expect_all("profile", self.cfg.startup_timeout_s)])

    def allocate_kv(self, total_blocks: int, block_size: int) -> None:
        self._send(("kv", total_blocks, block_size))

    def send_step(self, step: StepInputs) -> None:
        """Tell the workers a step follows, then broadcast its inputs (bounded by the group's
        timeout: a hung worker makes this, or the forward's first all-reduce, raise)."""
        self._send(("step",))
        send_step(self.comm, step)

    def _send(self, msg: tuple) -> None:
        for i, conn in enumerate(self.conns):
            try:
                conn.send(msg)  # a few bytes: never fills the pipe of a live worker
            except OSError as e:
                raise WorkerLost(f"{_name(i)} is gone: {e}") from e

    def explain(self, error: BaseException) -> str:
        """Why a step failed: a worker that exited, else the collective's own error."""
        return self.lost() or f"a collective between the ranks failed: {error}"

    def lost(self) -> str | None:
        for i, proc in enumerate(self.procs):
            if proc.exitcode is not None:
                return f"{_name(i)} (pid {proc.pid}) exited with code {proc.exitcode}"
        return None

    def watch(self, on_lost: Callable[[str], None]) -> None:
        """Call `on_lost(reason)` (from a thread of its own) as soon as a worker exits, unless
        `close` was called first. A later call replaces the callback (an engine started again
        on another event loop)."""
        self._on_lost = on_lost
        if self._watcher is not None:
            return

        def run() -> None:
            sentinels = [p.sentinel for p in self.procs]
            while not self._closing.is_set():
                ready = wait(sentinels, timeout=0.5)
                if ready and not self._closing.is_set():
                    for p in self.procs:  # its pipe closes before it can be reaped: wait
                        if p.sentinel in ready:
                            p.join(1.0)
                    try:
                        self._on_lost(self.lost() or "a worker exited")
                    except RuntimeError:  # that event loop is closed: nobody to tell
                        log.warning("%s, with no engine running", self.lost())
                    return

        self._watcher = threading.Thread(target=run, name="epd-tp-watch", daemon=True)
        self._watcher.start()

    def kill(self) -> None:
        """Failure path: end the workers now (a collective of ours still waiting on them then
        fails at once instead of at its timeout)."""
        self._closing.set()
        _kill(self.procs)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop every worker (SIGKILL for one that does not exit in time), then leave the
        group. Call from the torch thread, with no forward in flight."""
        self._closing.set()
        for conn in self.conns:
            with contextlib.suppress(OSError):  # already gone
                conn.send(("stop",))
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        _kill(self.procs)
        for conn in self.conns:
            conn.close()
        self.comm.close()


def expect_all(
    procs: list[BaseProcess], conns: list[Connection], kind: str, timeout_s: float
) -> list[Any]:
    """Each worker's next message, which must be `kind`: its payload, by rank. Raises
    WorkerLost as soon as one exits, or at the deadline."""
    deadline = time.monotonic() + timeout_s
    return [_expect(i, proc, conn, kind, deadline)
            for i, (proc, conn) in enumerate(zip(procs, conns, strict=True))]  # fmt: skip


def _expect(i: int, proc: BaseProcess, conn: Connection, kind: str, deadline: float) -> Any:
    while not conn.poll(POLL_S):
        if proc.exitcode is not None:
            raise WorkerLost(f"{_name(i)} (pid {proc.pid}) exited with code "
                             f"{proc.exitcode} before {kind!r}")  # fmt: skip
        if time.monotonic() > deadline:
            raise WorkerLost(f"{_name(i)} sent no {kind!r} in time")
    try:
        msg = conn.recv()
    except (EOFError, OSError) as e:
        raise WorkerLost(f"{_name(i)} closed its pipe before {kind!r}") from e
    if msg[0] != kind:
        raise WorkerLost(f"{_name(i)} sent {msg[0]!r}, expected {kind!r}")
    return msg[1] if len(msg) > 1 else None


def _kill(procs: list[BaseProcess]) -> None:
    for proc in procs:
        if proc.exitcode is None:
            proc.kill()
    for proc in procs:
        proc.join()


def _name(i: int) -> str:
    return f"tensor-parallel rank {i + 1}"
