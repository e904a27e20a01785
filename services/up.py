"""`epd up`: the whole system on loopback as child processes (the embedded default).

Starts N encoders, one language service and the gateway, each as `python -m services.cli ROLE`,
waits until every one reports healthy, prints the endpoints, and then supervises them: a child
that exits is logged and started again on the same port after a backoff (1 s, doubling up to
30 s, back to 1 s once it has run for a minute), while the others keep serving. On Ctrl-C (or
SIGTERM) it stops them all: SIGTERM first (each drains), SIGKILL for any that outlive the grace
period. Each child's output goes to a log file (appended to across restarts) whose tail is
printed if a child dies during start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from common.cores import create_ledger
from common.grpc_bootstrap import health_check
from services.language.parallel.config import (
    ParallelConfig,
    add_parallel_arguments,
    parallel_arguments,
    parallel_config_from_args,
)

log = logging.getLogger("epd.up")

THREAD_POLICIES = ("share", "split", "none")
BACKOFF_S = (1.0, 30.0)  # first and longest wait before restarting a child that exited
STABLE_S = 60.0  # a child that ran this long starts over at the first backoff


@dataclass(frozen=True)
class StackConfig:
    model: str
    encoders: int = 1
    transport: str = "auto"
    dtype: str = "float32"
    http_port: int = 8000  # 0 = any free port
    kv_cache_bytes: int = 512 << 20
    log_dir: str | None = None
    api_key: str | None = None
    extra_encoder_args: tuple[str, ...] = ()
    extra_language_args: tuple[str, ...] = ()
    extra_gateway_args: tuple[str, ...] = ()
    # How the torch roles use the cores (THREAD_POLICIES): "share" = each forward claims the
    # cores no other role holds (common.cores), "split" = a fixed share each (`thread_budget`),
    # "none" = torch's default everywhere (one thread per core each: busy roles oversubscribe).
    threads: str = "share"
    # The language service's --tensor-parallel-size, --enable-expert-parallel, timeout.
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if self.threads not in THREAD_POLICIES:
            raise ValueError(f"threads must be one of {THREAD_POLICIES}, got {self.threads!r}")


@dataclass
class Child:
    """One role's process, and what it takes to start it again."""

    name: str  # "encoder-0", "language", "gateway"
    role: str
    argv: list[str]
    log_path: Path
    grpc_address: str
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = BACKOFF_S[0]
    restart_at: float | None = None  # when an exited child is started again
    env: dict[str, str] = field(default_factory=dict)  # on top of this process's environment

    def spawn(self) -> None:
        out = self.log_path.open("ab")
        env = dict(os.environ, UCX_WARN_UNUSED_ENV_VARS="n", PYTHONUNBUFFERED="1", **self.env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", self.role, *self.argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C reaches `epd up`, which stops the children in order
        )
        out.close()
        self.started_at = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


@dataclass
class Stack:
    cfg: StackConfig
    children: list[Child] = field(default_factory=list)
    http_port: int = 0
    gateway_grpc: str = ""
    _stopping: threading.Event = field(default_factory=threading.Event)
    _supervisor: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ledger: Path | None = None  # the roles' core ledger (threads "share")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1"

    def role(self, name: str) -> list[Child]:
        return [c for c in self.children if c.role == name]

    @property
    def restarts(self) -> int:
        return sum(c.restarts for c in self.children)

    def start(self, timeout: float = 300.0) -> None:
        log_dir = Path(self.cfg.log_dir or tempfile.mkdtemp(prefix="epd-up-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        common = ["--model", self.cfg.model, "--host", "127.0.0.1"]
        cores = available_cores()
        enc_threads, lang_threads = thread_budget(cores, self.cfg.encoders)
        if self.cfg.threads == "share":
            # Not "epd-*": encoders sweep unlocked /dev/shm/epd-* files as stale segments.
            self._ledger = Path(f"/dev/shm/epd_cores-{os.getpid()}-{secrets.token_hex(4)}")
            create_ledger(self._ledger, self.cfg.encoders + 1)
        enc_addrs = []
        for i in range(self.cfg.encoders):
            port = free_port()
            enc_addrs.append(f"127.0.0.1:{port}")
            self._add(f"encoder-{i}", "encoder", log_dir, port, [
                *common, "--port", str(port), "--transport", self.cfg.transport,
                "--dtype", self.cfg.dtype,
                *self._threads(enc_threads, i, cores, self.cfg.extra_encoder_args),
                *self.cfg.extra_encoder_args,
            ])  # fmt: skip
        lang_port = free_port()
        self._add("language", "language", log_dir, lang_port, [
            *common, "--port", str(lang_port), "--dtype", self.cfg.dtype,
            "--kv-cache-bytes", str(self.cfg.kv_cache_bytes),
            *parallel_arguments(self.cfg.parallel),
            *self._threads(lang_threads, self.cfg.encoders, cores, self.cfg.extra_language_args),
            *self.cfg.extra_language_args,
        ])  # fmt: skip
        self._wait_grpc(timeout)
        self.http_port = self.cfg.http_port or free_port()
        gw_port = free_port()
        self.gateway_grpc = f"127.0.0.1:{gw_port}"
        args = [*common, "--port", str(self.http_port), "--grpc-port", str(gw_port),
                "--language", f"127.0.0.1:{lang_port}", "--encoders", ",".join(enc_addrs),
                *self.cfg.extra_gateway_args]  # fmt: skip
        if self.cfg.api_key:
            args += ["--api-key", self.cfg.api_key]
        self._add("gateway", "gateway", log_dir, gw_port, args)
        self._wait_http(timeout)
        self._supervisor = threading.Thread(target=self._supervise, name="epd-up-supervisor",
                                            daemon=True)  # fmt: skip
        self._supervisor.start()

    def stop(self, grace: float = 15.0) -> None:
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
        with self._lock:
            procs = [(c, c.proc) for c in reversed(self.children) if c.proc is not None]
        for _, proc in procs:  # gateway first: no new work reaches the backends
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + grace
        for c, proc in procs:
            try:
                proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", c.name, grace)
                proc.kill()
                proc.wait()
        if self._ledger is not None:
            self._ledger.unlink(missing_ok=True)

    def _threads(self, n: int, slot: int, cores: int, extra: tuple[str, ...]) -> list[str]:
        """A role's thread flags under the stack's policy, unless the caller chose for it."""
        if "--num-threads" in extra or "--share-cores" in extra or self.cfg.threads == "none":
            return []
        if self.cfg.threads == "split":
            return ["--num-threads", str(n)]
        return ["--share-cores", f"{self._ledger},{slot},{cores}"]

    def _add(self, name: str, role: str, log_dir: Path, port: int, argv: list[str]) -> None:
        env = omp_environment(role, self.cfg.threads, os.environ)
        child = Child(name, role, argv, log_dir / f"{name}.log", f"127.0.0.1:{port}", env=env)
        child.spawn()
        self.children.append(child)

    def _supervise(self) -> None:
        """Restart children that exit, with backoff, until the stack stops."""
        while not self._stopping.wait(0.2):
            now = time.monotonic()
            with self._lock:
                for c in self.children:
                    self._tend(c, now)

    def _tend(self, c: Child, now: float) -> None:
        if c.alive or c.proc is None:
            return
        if c.restart_at is None:
            if now - c.started_at >= STABLE_S:
                c.backoff_s = BACKOFF_S[0]
            c.restart_at = now + c.backoff_s
            log.warning("%s (pid %d) exited with code %s; restarting it in %.0f s (log %s)",
                        c.name, c.proc.pid, c.proc.returncode, c.backoff_s, c.log_path)  # fmt: skip
            c.backoff_s = min(BACKOFF_S[1], c.backoff_s * 2)
        elif now >= c.restart_at:
            c.restart_at = None
            c.restarts += 1
            c.spawn()
            assert c.proc is not None
            log.info("%s restarted (pid %d, restart %d)", c.name, c.proc.pid, c.restarts)

    def check_alive(self) -> None:
        """During start-up: a child that exited fails the start, with its log's tail."""
        for c in self.children:
            if c.proc is not None and c.proc.poll() is not None:
                raise RuntimeError(
                    f"{c.name} exited with code {c.proc.returncode}; last log lines "
                    f"({c.log_path}):\n{c.tail()}"
                )

    def _wait_grpc(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        pending = list(self.children)
        while pending:
            self.check_alive()
            if time.monotonic() > end:
                raise TimeoutError(
                    f"not healthy after {timeout:.0f} s: {[c.name for c in pending]}"
                )
            for c in list(pending):
                with contextlib.suppress(grpc.RpcError):
                    if health_check(c.grpc_address, timeout=1.0) == "SERVING":
                        pending.remove(c)
            time.sleep(0.2)

    def _wait_http(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.http_port}/health"
        while True:
            self.check_alive()
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1.0) as r:
                if r.status == 200:
                    return
            if time.monotonic() > end:
                raise TimeoutError(f"gateway not healthy after {timeout:.0f} s")
            time.sleep(0.2)


@contextlib.contextmanager
def running_stack(cfg: StackConfig, timeout: float = 300.0) -> Iterator[Stack]:
    stack = Stack(cfg)
    try:
        stack.start(timeout)
        yield stack
    finally:
        stack.stop()


# libgomp pauses an idle OpenMP thread spins before it sleeps, in both torch roles (see
# omp_environment)
SPIN_COUNT = "100000"


def available_cores() -> int:
    return len(os.sched_getaffinity(0))


def omp_environment(role: str, threads: str, environ: Mapping[str, str]) -> dict[str, str]:
    """OpenMP settings of a role that shares the host's cores with the others.

    libgomp's threads spin for a while after every parallel region before they sleep
    (GOMP_SPINCOUNT; by default ~10 ms on the 2-core test machine, measured as the workers' CPU
    time after a last region). A forward runs hundreds of regions with Python between them, and
    a thread that sleeps in those gaps pays a futex wake-up at the next region. Both torch roles
    spin 100,000 pauses (~2-3 ms), not the default: past that a role is waiting for work, often
    for the other role, whose cores its spinning team takes.
    - Language service, default vs 100,000 (interleaved rounds on 2 cores, `epd up`, small
      checkpoint, images): 243-280 vs 264-309 tok/s at concurrency 8 (five rounds), 372-421 vs
      412-424 at 32 (three), text at 32 1,032-1,122 vs 1,074-1,245 (two).
    - Encoder, 1,000 vs 100,000 pauses: with 1,000 its workers fell asleep between a forward's
      regions whenever Python between two ops took longer than the spin, which depends on the
      host's speed: one 224x224 tower forward took 32-40 ms alone (100,000: 19-21 ms) and
      44-57 ms inside the stack at concurrency 1 (23-28 ms; three interleaved rounds each).
    A role whose environment already says how to wait (OMP_WAIT_POLICY or GOMP_SPINCOUNT) is
    left alone. (Under other load on the same cores a spinning team can be 10x slower, waiting
    on its own preempted threads: there, set OMP_WAIT_POLICY=PASSIVE, which `epd up` then
    passes to every role.)"""
    if threads == "none" or "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}
    return {"GOMP_SPINCOUNT": SPIN_COUNT} if role in ("encoder", "language") else {}


def thread_budget(cores: int, encoders: int) -> tuple[int, int]:
    """(threads per encoder, language threads) for `encoders` encoders on `cores` cores: the
    language service gets half of them, the encoders share the other half, one thread at least
    each (the gateway runs no torch). Two cores, one encoder: one thread each."""
    language = max(1, cores // 2)
    return max(1, (cores - language) // max(1, encoders)), language


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--encoders", type=int, default=1, help="encoder processes to start")
    parser.add_argument(
        "--transport",
        default="auto",
        choices=["auto", "shm", "nixl", "grpc"],
        help="how embeddings travel from encoders to the language service",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--http-port", type=int, default=8000, help="OpenAI API port (0 = any)")
    parser.add_argument("--kv-cache-bytes", type=int, default=StackConfig.kv_cache_bytes)
    parser.add_argument("--api-key", default=None, help="require this bearer key on the API")
    parser.add_argument("--log-dir", default=None, help="where child logs go (default: a temp dir)")
    parser.add_argument(
        "--reasoning-parser",
        default=None,
        choices=["qwen3"],
        help="the gateway's --reasoning-parser: <think>...</think> as reasoning_content",
    )
    add_parallel_arguments(parser.add_argument_group("the language service's parallelism"))
    parser.add_argument(
        "--threads",
        choices=THREAD_POLICIES,
        default=StackConfig.threads,
        help="how the roles use the cores: share = every forward takes the cores no other role "
        "is using (a role alone gets all of them, busy roles never oversubscribe them); split = "
        "half to the language service, half to the encoders, fixed (with share and split idle "
        "OpenMP threads spin only briefly, GOMP_SPINCOUNT=100000 in encoders and the language "
        "service, unless the environment sets OMP_WAIT_POLICY or GOMP_SPINCOUNT); "
        "none = torch's default",
    )


def config_from_args(args: argparse.Namespace) -> StackConfig:
    return StackConfig(
        model=args.model,
        encoders=args.encoders,
        transport=args.transport,
        dtype=args.dtype,
        http_port=args.http_port,
        kv_cache_bytes=args.kv_cache_bytes,
        log_dir=args.log_dir,
        api_key=args.api_key,
        threads=args.threads,
        parallel=parallel_config_from_args(args),
        extra_gateway_args=("--reasoning-parser", args.reasoning_parser)
        if args.reasoning_parser
        else (),
    )


def run(args: argparse.Namespace) -> int:
    stack = Stack(config_from_args(args))
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        stack.start()
        print(f"OpenAI API:  {stack.base_url}  (model: {Path(args.model).resolve().name})")
        print(f"gRPC Chat:   {stack.gateway_grpc}")
        for c in stack.children:
            pid = c.proc.pid if c.proc else 0
            print(f"{c.role:<9} {c.grpc_address}  pid {pid}  log {c.log_path}")
        print("Ctrl-C stops everything; a role that exits is restarted.", flush=True)
        while not stop.wait(0.5):
            pass
    except (RuntimeError, TimeoutError) as e:
        print(f"epd up: {e}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
    return 0
