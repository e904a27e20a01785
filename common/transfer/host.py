"""Identity of this host, as carried in shared-memory handles and Encode calls."""

from __future__ import annotations

import functools
import socket
from pathlib import Path

from common.transfer import fabric


@functools.cache
def host_id() -> str:
    """'<hostname>/<kernel boot id>[;rdma]': differs across machines and across reboots of one
    machine; ';rdma' says the host has a usable RDMA device (`fabric.py`), which `auto` needs at
    both ends before it publishes through NIXL to another host.

    Containers on one node share the boot id but usually not the hostname; pods that share
    /dev/shm should share the hostname too (hostNetwork or a common `hostname:`), else `auto`
    picks another backend for them.
    """
    boot = Path("/proc/sys/kernel/random/boot_id")
    boot_id = boot.read_text().strip() if boot.exists() else "unknown-boot"
    return fabric.tag(f"{socket.gethostname()}/{boot_id}")
