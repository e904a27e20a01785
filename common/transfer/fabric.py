"""What NIXL's UCX can reach a peer over, for `auto`'s choice between hosts.

UCX uses the fastest transport both ends have. Between hosts without an RDMA device that is TCP,
where NIXL is the slowest backend we have: across three network namespaces on one machine a
16 MiB NIXL READ over UCX/TCP moved 0.17 GB/s (0.29 with NIXL's progress thread) against 0.65
GB/s for the grpc stream, and 1 MiB took ~62 ms against ~3 ms (FACTS.md). So `auto` publishes
through NIXL to another host only when both ends have a usable RDMA device (InfiniBand, RoCE,
iWARP and EFA all appear under /sys/class/infiniband) and this end's UCX may use it.

A host's fabric travels inside its host identity (`host.host_id()`): "<hostname>/<boot id>" with
";rdma" appended when it has RDMA. The language service reports its identity and the gateway
hands it to the encoder with every Encode call, so the producer knows the pair.
"""

from __future__ import annotations

import ctypes.util
import functools
import os
from pathlib import Path

SYSFS_RDMA = Path("/sys/class/infiniband")
RDMA_TAG = "rdma"

# UCX transport names (UCX_TLS) that run over an RDMA device, by family: the family's name is
# UCX's alias for all of its members, and "ib" for every verbs one; "srd" is EFA's.
RDMA_FAMILIES = {
    "rc": {"rc", "rc_v", "rc_verbs", "rc_x", "rc_mlx5"},
    "ud": {"ud", "ud_v", "ud_verbs", "ud_x", "ud_mlx5"},
    "dc": {"dc", "dc_x", "dc_mlx5"},
    "srd": {"srd"},
}
RDMA_TRANSPORTS = frozenset({"ib"}.union(*RDMA_FAMILIES.values()))


def active_rdma_ports(sysfs: Path = SYSFS_RDMA) -> list[str]:
    """'device:port' of every RDMA port whose link is up (its state file says ACTIVE)."""
    if not sysfs.is_dir():
        return []
    found = []
    for state in sorted(sysfs.glob("*/ports/*/state")):
        try:
            if "ACTIVE" in state.read_text():
                found.append(f"{state.parents[2].name}:{state.parent.name}")
        except OSError:  # a device going away while we look
            continue
    return found


@functools.cache
def has_rdma() -> bool:
    """An RDMA port is up and the verbs library UCX's RDMA transports load is installed."""
    return bool(active_rdma_ports()) and ctypes.util.find_library("ibverbs") is not None


def tls_allows_rdma(ucx_tls: str | None) -> bool:
    """Whether a UCX_TLS value (None or "" = UCX's default, all) leaves an RDMA transport in.

    UCX_TLS is a comma list of transports to use, or "^list" for all but those."""
    spec = (ucx_tls or "all").strip()
    names = {n.strip() for n in spec.removeprefix("^").split(",") if n.strip()}
    if spec.startswith("^"):  # some family left whose alias (or every member) is not excluded
        return "ib" not in names and any(
            family not in names and not members <= names
            for family, members in RDMA_FAMILIES.items()
        )
    return "all" in names or bool(names & RDMA_TRANSPORTS)


def local_rdma(ucx_tls: str | None) -> bool:
    """This process's UCX can use RDMA: the hardware is there and UCX_TLS (`ucx_tls`, else the
    environment's) does not exclude it."""
    return has_rdma() and tls_allows_rdma(ucx_tls or os.environ.get("UCX_TLS"))


def tag(identity: str) -> str:
    """A host identity with this host's fabric appended."""
    return f"{identity};{RDMA_TAG}" if has_rdma() else identity


def peer_has_rdma(peer_host: str | None) -> bool:
    """Whether a peer's host identity says it has RDMA."""
    return bool(peer_host) and RDMA_TAG in (peer_host or "").split(";")[1:]
