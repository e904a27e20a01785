"""How the decoder is split over ranks: the settings and their flags (vLLM's names)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelConfig:
    # Ranks (processes, one device each) that hold a part of every layer; 1 = no parallelism.
    tensor_parallel_size: int = 1
    # Experts whole, E/N per rank, instead of every expert's intermediate dimension split.
    enable_expert_parallel: bool = False
    # Longest wait of one collective (or of a worker's reply) before the replica gives up on
    # its ranks: a hung worker fails the requests within this bound.
    timeout_s: float = 20.0
    # Longest wait for the workers to start and load their shards.
    startup_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"--tensor-parallel-size must be positive, got {self.tensor_parallel_size}"
            )
        if self.timeout_s <= 0 or self.startup_timeout_s <= 0:
            raise ValueError("--distributed-timeout must be positive")

    @property
    def enabled(self) -> bool:
        return self.tensor_parallel_size > 1


def add_parallel_arguments(group: argparse._ArgumentGroup) -> None:
    """The flags, shared by the engine (`epd language`, `epd generate`) and `epd up`."""
    d = ParallelConfig()
    group.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=d.tensor_parallel_size,
        help="split every layer over N processes (one device each: cuda:0..N-1, or N CPU "
        "processes over gloo); rank 0 schedules, samples and serves",
    )
    group.add_argument(
        "--enable-expert-parallel",
        action="store_true",
        help="with -tp N: E/N whole experts per rank instead of every expert's width split",
    )
    group.add_argument(
        "--distributed-timeout",
        type=float,
        default=d.timeout_s,
        help="seconds one collective between ranks may wait; a worker that dies or hangs "
        "fails the replica (NOT_SERVING, requests UNAVAILABLE, exit 1) within it",
    )


def parallel_config_from_args(args: argparse.Namespace) -> ParallelConfig:
    return ParallelConfig(
        tensor_parallel_size=args.tensor_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel,
        timeout_s=args.distributed_timeout,
    )


def parallel_arguments(cfg: ParallelConfig) -> list[str]:
    """`cfg` as the flags that give it (a child process's command line)."""
    flags = ["--tensor-parallel-size", str(cfg.tensor_parallel_size),
             "--distributed-timeout", str(cfg.timeout_s)]  # fmt: skip
    return flags + (["--enable-expert-parallel"] if cfg.enable_expert_parallel else [])
