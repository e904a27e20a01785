"""Several hosts on one machine: network namespaces joined by a bridge, for `bench-transfer
--netns` and tests/multihost.

Each host is a network namespace with its own address and loopback, wired by a veth pair to a
bridge that lives in a namespace of its own, so the machine's own namespace gains no interface,
address or rule. A process started through `Host.argv` also gets its own hostname, PIDs and IPC
(UTS, PID and IPC namespaces): `host_id()` differs between hosts as between machines, and UCX,
which would otherwise see one machine and move NIXL READs by cross-memory attach (14 GB/s
measured), has only TCP between hosts, as between machines without RDMA. Needs root, `ip netns`
and `unshare`.

    with Fabric(["encoder", "language"]) as net:
        subprocess.run(net["encoder"].argv(["ip", "addr"]))
        net["language"].set_loss(0.01)   # 1 % of its outgoing packets dropped at random

`close()` kills whatever still runs in the namespaces, then deletes them (with them go their
veths, the bridge and any iptables rule made inside).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

SUBNET = "10.213.0"  # /24 inside the bridge namespace: unreachable from anywhere else
_FABRICS = itertools.count()


def available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        return f"`ip netns` does not work here: {probe.stderr.strip()}"
    if shutil.which("unshare") is None:
        return "needs util-linux's `unshare` (a hostname per host)"
    return None


def loss_available() -> str | None:
    """None if hosts can lose and block packets (`Host.set_loss`, `Host.block`), else why not."""
    if shutil.which("iptables") is None:
        return "needs `iptables` (apt-get install iptables)"
    return available()


def _ip(*args: str, netns: str | None = None) -> None:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")


@dataclass(frozen=True)
class Host:
    name: str  # also its hostname
    netns: str
    address: str

    def argv(self, cmd: list[str]) -> list[str]:
        """`cmd` run on this host: in its network namespace, under its own hostname."""
        set_name = 'hostname "$0" && exec "$@"'
        # --kill-child: killing the unshare process (our Popen's pid) kills the host's PID 1,
        # and with it every process of that PID namespace.
        unshare = ["unshare", "--uts", "--ipc", "--pid", "--fork", "--kill-child", "--mount",
                   "--mount-proc", "--"]  # fmt: skip
        return ["ip", "netns", "exec", self.netns, *unshare, "sh", "-c", set_name, self.name, *cmd]

    def pids(self) -> list[int]:
        """Every process in this host's network namespace (machine-wide PIDs)."""
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True,
                             text=True, timeout=10).stdout  # fmt: skip
        return [int(p) for p in out.split()]

    def kill_all(self) -> list[int]:
        """SIGKILL every process of this host (as a machine losing power); the pids killed."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                os.kill(pid, signal.SIGKILL)
        return pids

    # One rule set per host at a time: each of these replaces what the others set.
    def set_loss(self, probability: float) -> None:
        """Drop this fraction of the host's outgoing packets at random (`tc netem` is not in
        every kernel; iptables' statistic match is). 0 removes the rule."""
        self.unblock()
        if probability > 0:
            self._iptables("-A", "OUTPUT", "-m", "statistic", "--mode", "random",
                           "--probability", f"{probability:.4f}", "-j", "DROP")  # fmt: skip

    def block(self, address: str) -> None:
        """Drop every packet this host sends to `address` (a link that went silent)."""
        self._iptables("-A", "OUTPUT", "-d", address, "-j", "DROP")

    def unblock(self) -> None:
        """Remove every loss and block rule of this host."""
        self._iptables("-F", "OUTPUT")

    def _iptables(self, *args: str) -> None:
        argv = ["ip", "netns", "exec", self.netns, "iptables", "-w", *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")


class Fabric:
    """Hosts on one bridge; the names map to `Host`s. Always `close()` (or use `with`)."""

    def __init__(self, names: list[str]) -> None:
        if len(names) > 200:
            raise ValueError("at most 200 hosts on one bridge")
        # Unique per fabric and process: parallel runs (or a killed run's leftovers) never collide.
        self.prefix = f"epd{os.getpid()}n{next(_FABRICS)}"
        self.bridge_netns = f"{self.prefix}-br"
        self.hosts: dict[str, Host] = {}
        self._made: list[str] = []
        try:
            self._build(names)
        except BaseException:
            self.close()
            raise

    def _build(self, names: list[str]) -> None:
        self._add_netns(self.bridge_netns)
        _ip("link", "add", "br0", "type", "bridge", netns=self.bridge_netns)
        _ip("link", "set", "br0", "up", netns=self.bridge_netns)
        for i, name in enumerate(names):
            netns = f"{self.prefix}-{name}"
            self._add_netns(netns)
            port = f"v{i}"
            _ip("link", "add", port, "netns", self.bridge_netns, "type", "veth",
                "peer", "name", "eth0", "netns", netns)  # fmt: skip
            _ip("link", "set", port, "master", "br0", "up", netns=self.bridge_netns)
            address = f"{SUBNET}.{i + 1}"
            _ip("addr", "add", f"{address}/24", "dev", "eth0", netns=netns)
            _ip("link", "set", "eth0", "up", netns=netns)
            _ip("link", "set", "lo", "up", netns=netns)
            self.hosts[name] = Host(name, netns, address)

    def _add_netns(self, netns: str) -> None:
        _ip("netns", "add", netns)
        self._made.append(netns)

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def close(self) -> None:
        """Kill every process left in our namespaces, then delete them. Idempotent."""
        for host in self.hosts.values():
            host.kill_all()
        deadline = time.monotonic() + 10
        while any(h.pids() for h in self.hosts.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for netns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=10)
        self._made.clear()
        self.hosts.clear()

    def __enter__(self) -> Fabric:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
