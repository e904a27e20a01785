"""The ranks' process group: gloo on CPU, NCCL on CUDA, every collective bounded in time.

Rank 0 hosts the rendezvous (a `TCPStore` on loopback, on a port the OS picks) and hands its
port to the workers it spawns. The group's timeout bounds each collective: a peer that died or
hangs makes the collective raise on the others instead of waiting forever (gloo raises at
once when a peer's socket closes, and after the timeout when it hangs).
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

HOST = "127.0.0.1"


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def master_store(world: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's rendezvous store; its `.port` goes to the workers."""
    timeout = datetime.timedelta(seconds=timeout_s)
    return dist.TCPStore(HOST, 0, world, is_master=True, timeout=timeout, wait_for_workers=False)


class Comm:
    """This process's rank in the default process group, and the collectives the decoder uses."""

    def __init__(
        self,
        rank: int,
        world: int,
        device: torch.device,
        timeout_s: float,
        store: dist.Store | None = None,
        port: int | None = None,
    ) -> None:
        """Rank 0 passes its `master_store`, the others its `port`."""
        if store is None:
            assert port is not None
            store = dist.TCPStore(HOST, port, world, is_master=False,
                                  timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.rank, self.world, self.device = rank, world, device
        dist.init_process_group(
            backend_for(device), store=store, rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )  # fmt: skip

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place; every rank gets the same result."""
        dist.all_reduce(t)
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` into every rank's `t` (same shape and dtype, contiguous)."""
        dist.broadcast(t, src=0)
        return t

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
