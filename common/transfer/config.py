"""Transfer layer configuration: one frozen dataclass, built once at the edge (CLI or service)."""

from __future__ import annotations

from dataclasses import dataclass

from common.tls import ClientTLS

BACKEND_CHOICES = ("auto", "shm", "nixl", "grpc")

MIB = 1 << 20


@dataclass(frozen=True)
class TransferConfig:
    """How a producer publishes tensors and how a consumer fetches them.

    The producer's `backend` decides which location a handle carries; a consumer reads whatever
    location a handle names (its own `backend` is irrelevant), so only producers need agreeing.
    """

    # Producer: "shm" (same host), "nixl" (UCX READ, any host), "grpc" (TensorStore stream), or
    # "auto" (shm for a consumer on this host; nixl for another host when both ends have RDMA or,
    # with nixl_progress_thread, for small tensors; else grpc: producer.enabled_backends).
    backend: str = "auto"
    # Producer pool capacity in bytes: preallocated and registered once, never grown.
    pool_bytes: int = 1 << 30
    # How long an unacknowledged handle stays valid, in seconds.
    lease_s: float = 60.0
    # Consumer: default time allowed for one fetch, in seconds, when the caller gives no deadline.
    fetch_timeout_s: float = 30.0
    # gRPC backend: bytes per streamed chunk (1-4 MiB measured best).
    chunk_bytes: int = 1 * MIB
    # Producer: put a CRC-32 of the data in every handle (costs one pass over the bytes).
    checksum: bool = False
    # Producer: how often the background reaper frees acknowledged and expired tensors, seconds.
    reap_interval_s: float = 0.02
    # Name prefix of our /dev/shm segments; stale ones with this prefix are swept at start.
    shm_prefix: str = "epd-"
    # Producer pool memory: "cpu", or "cuda[:N]" (nixl only: VRAM read by cuda_ipc / GPUDirect).
    device: str = "cpu"
    # NIXL's UCX progress thread busy-polls a whole core (measured 1.98 CPU-s per 2 s idle). One-
    # sided READs over CMA or RDMA need no producer progress; the reaper progresses the agent
    # every `reap_interval_s` for connection set-up. Enable for TCP-only fabrics.
    nixl_progress_thread: bool = False
    # UCX transports and devices NIXL may use in this process (UCX_TLS / UCX_NET_DEVICES, e.g.
    # "rc,sm,self" or "tcp"; "mlx5_0:1"). None leaves UCX's default (all) or the environment's.
    # UCX reads them from the environment whenever a NIXL agent is made: set here, they apply to
    # every agent this process makes afterwards.
    ucx_tls: str | None = None
    ucx_net_devices: str | None = None
    # Consumer, grpc backend: TLS to producers' TensorStore (None = plaintext).
    client_tls: ClientTLS | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {self.backend!r}")
        if self.pool_bytes <= 0:
            raise ValueError(f"pool_bytes must be positive, got {self.pool_bytes}")
        if self.lease_s <= 0 or self.fetch_timeout_s <= 0 or self.reap_interval_s <= 0:
            raise ValueError("lease_s, fetch_timeout_s and reap_interval_s must be positive")
        if not 64 * 1024 <= self.chunk_bytes <= 4 * MIB:
            raise ValueError(f"chunk_bytes must be within 64 KiB..4 MiB, got {self.chunk_bytes}")
        if not self.shm_prefix.startswith("epd-") or "/" in self.shm_prefix:
            raise ValueError(f"shm_prefix must start with 'epd-', without '/': {self.shm_prefix!r}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        for name, value in (("ucx_tls", self.ucx_tls), ("ucx_net_devices", self.ucx_net_devices)):
            if value is not None and (not value.strip() or any(c.isspace() for c in value)):
                raise ValueError(f"{name} must be a UCX comma list without spaces: {value!r}")
        if self.device != "cpu" and self.backend not in ("nixl", "auto"):
            raise ValueError("a CUDA pool can only be published through the nixl backend")
