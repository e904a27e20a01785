"""The one thread of a process that runs its torch compute.

torch's CPU build runs intra-op parallelism on libgomp (GNU OpenMP), which keeps a team of
worker threads for every thread that ever entered a parallel region, for as long as that thread
lives. Once a process holds more OpenMP threads than it has CPUs, libgomp throttles its
spin-wait between parallel regions to a few hundred iterations (`gomp_throttled_spin_count_var`),
so every later region pays futex wake-ups. A forward pass is thousands of regions: on the 2-core
dev VM one extra team (weights loaded on one pool thread, forwards run on another) made a
prefill-sized loop 25-30% slower (202 -> 254-263 ms, median of 30). So a service loads,
warms up and runs every forward on this single thread, and other threads (event loop,
preprocessing, transfers) stick to numpy or small tensors.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_ident: int | None = None


def torch_executor() -> ThreadPoolExecutor:
    """The process-wide single-thread executor for torch work (created on first use, never
    shut down: it lives as long as the process, like the OpenMP team it anchors)."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(1, thread_name_prefix="epd-torch")
            _executor.submit(_remember_ident).result()
        return _executor


def _remember_ident() -> None:
    global _ident
    _ident = threading.get_ident()


def on_torch_thread_now() -> bool:
    """Whether the caller is the torch thread."""
    return _ident is not None and threading.get_ident() == _ident


def call_on_torch_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)` on the torch thread and wait for it (inline when already there)."""
    if on_torch_thread_now():
        return fn(*args)
    return torch_executor().submit(fn, *args).result()


async def run_on_torch_thread(fn: Callable[..., T], *args: Any) -> T:
    """Await `fn(*args)` on the torch thread, leaving the event loop free meanwhile. The loop
    must not itself run on the torch thread (it would wait on its own thread)."""
    return await asyncio.get_running_loop().run_in_executor(torch_executor(), fn, *args)


async def wait_torch_thread_idle() -> None:
    """Return once everything submitted to the torch thread before this call has run (its queue
    runs in order), e.g. so that a stopped engine has no forward left in flight."""
    await run_on_torch_thread(_nothing)


def _nothing() -> None:
    pass


def add_threads_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--num-threads` and `--share-cores`, for the roles that run torch."""
    parser.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch threads of this process (default: one per core it may use)",
    )
    parser.add_argument(
        "--share-cores",
        default=None,
        metavar="PATH,SLOT,CORES",
        help="share CORES cores with the other roles of this host through the ledger at PATH, "
        "claiming the free ones at every forward (`epd up` sets it; see common/cores.py)",
    )


def set_torch_threads(n: int | None) -> None:
    """Size the torch thread's OpenMP team; call on the torch thread before its first forward."""
    if n is None:
        return
    if n <= 0:
        raise ValueError(f"--num-threads must be positive, got {n}")
    import torch  # here, not at the top: this module is imported by torch-free code too

    torch.set_num_threads(n)
