"""Raw copy paths between two processes on this host: the ceilings our backends sit on.

- `tcp`: a loopback TCP socket, the child `sendall`s from a buffer and the parent `recv_into`s a
  preallocated one. No protocol at all: the most any gRPC stream over TCP can reach. Across
  network namespaces (`bench-transfer --netns`) the same copy runs over their veth link.
- `cma`: `process_vm_readv` of the child's buffer into the parent's, the cross-memory-attach copy
  UCX uses for NIXL READs on one host without RDMA: the most NIXL can reach here.

    python -m bench.transfer_ceiling tcp PORT SIZE_BYTES [HOST]   (the child side; the parent
                                                                   starts it)
"""

from __future__ import annotations

import ctypes
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from subprocess import Popen

import numpy as np

CEILINGS = ("tcp", "cma")


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def measure(
    kind: str,
    size_bytes: int,
    repeats: int,
    host: str = "127.0.0.1",
    wrap: Callable[[list[str]], list[str]] | None = None,
) -> float:
    """Median GB/s (1e9 bytes/s) of `repeats` timed copies of `size_bytes`, after two warm-ups.

    tcp only: this process listens on `host`, and `wrap` turns the sending child's command into
    the one to run (another network namespace)."""
    if kind not in CEILINGS:
        raise ValueError(f"unknown ceiling {kind!r}; choose from {CEILINGS}")
    dst = np.zeros(size_bytes, dtype=np.uint8)  # zeroed: prefaulted
    times = _tcp(dst, repeats + 2, host, wrap) if kind == "tcp" else _cma(dst, repeats + 2)
    if not (dst == 1).all():  # the child's buffer is all ones
        raise RuntimeError(f"{kind} reference: the copied bytes are wrong")
    return size_bytes / statistics.median(times[2:]) / 1e9


def _child(*args: str, wrap: Callable[[list[str]], list[str]] | None = None) -> Popen[bytes]:
    cmd = [sys.executable, "-m", "bench.transfer_ceiling", *args]
    return Popen(wrap(cmd) if wrap else cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def _tcp(
    dst: np.ndarray, rounds: int, host: str, wrap: Callable[[list[str]], list[str]] | None
) -> list[float]:
    view, n = dst.data, dst.nbytes
    with socket.create_server((host, 0)) as listener:
        listener.settimeout(30)
        child = _child("tcp", str(listener.getsockname()[1]), str(n), host, wrap=wrap)
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(30)
                times = []
                for _ in range(rounds):
                    start = time.perf_counter()
                    conn.sendall(b"x")  # one request byte per round, as a fetch call would send
                    got = 0
                    while got < n:
                        chunk = conn.recv_into(view[got:], n - got)
                        if not chunk:
                            raise RuntimeError("tcp ceiling: the sender closed early")
                        got += chunk
                    times.append(time.perf_counter() - start)
        finally:
            _stop(child)
    return times


def _cma(dst: np.ndarray, rounds: int) -> list[float]:
    libc = ctypes.CDLL(None, use_errno=True)
    readv = libc.process_vm_readv
    readv.restype = ctypes.c_ssize_t
    n = dst.nbytes
    child = _child("cma", "0", str(n))
    try:
        assert child.stdout is not None
        address = int(child.stdout.readline())
        local, remote = _IoVec(dst.ctypes.data, n), _IoVec(address, n)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            got = readv(child.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
            times.append(time.perf_counter() - start)
            if got != n:
                err = ctypes.get_errno()
                raise RuntimeError(f"process_vm_readv read {got}/{n} bytes: {os.strerror(err)}")
    finally:
        _stop(child)
    return times


def _stop(child: Popen[bytes]) -> None:
    if child.stdin is not None:
        child.stdin.close()  # the child exits on EOF
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    if child.stdout is not None:
        child.stdout.close()


def _serve(kind: str, port: int, size: int, host: str = "127.0.0.1") -> None:
    src = np.ones(size, dtype=np.uint8)  # written: prefaulted
    if kind == "cma":
        sys.stdout.write(f"{src.ctypes.data}\n")
        sys.stdout.flush()
        sys.stdin.read()  # keep the buffer mapped until the parent is done
        return
    with socket.create_connection((host, port), timeout=30) as conn:
        while conn.recv(1):
            conn.sendall(src.data)


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5])
