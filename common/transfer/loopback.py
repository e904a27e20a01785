"""A producer in a child process on this host, driven over a pipe: for tests and benchmarks.

    python -m common.transfer.loopback --backend shm --pool-mib 64

The child hosts a TensorStore gRPC server on 127.0.0.1 (or `--host`; port 0) and answers one JSON
line per command on stdin: {"op": "publish", "dtype", "shape", "seed", "lease_s"?, "peer_host"?}
-> {"handle": base64},
{"op": "stats"} -> {"bytes_in_use", "tensors"}, {"op": "release", "id"} -> {"released"}.
`LoopbackProducer` is the parent's side. Tensors come from `make_tensor`, so the parent can
rebuild the expected value from (dtype, shape, seed).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import grpc
import torch

from common.rpc import tensor_pb2
from common.transfer.backends.grpc import CHANNEL_OPTIONS
from common.transfer.config import MIB, TransferConfig
from common.transfer.producer import Producer

_REPLY = "@@"  # prefix of our reply lines: a native library may print on stdout too


def make_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A deterministic tensor: normal floats, or integers spanning the dtype's small range."""
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    return torch.randint(-100 if dtype.is_signed else 0, 100, shape, generator=gen, dtype=dtype)


async def _serve(args: argparse.Namespace) -> None:
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    port = server.add_insecure_port(f"{args.host}:0")
    config = TransferConfig(
        backend=args.backend,
        pool_bytes=args.pool_mib * MIB,
        lease_s=args.lease_s,
        checksum=args.checksum,
        shm_prefix=args.shm_prefix,
        nixl_progress_thread=args.nixl_progress_thread,
    )
    producer = Producer(config, store_address=f"{args.host}:{port}")
    producer.servicer().add_to_server(server)
    await server.start()
    loop = asyncio.get_running_loop()
    cache: dict[tuple[str, tuple[int, ...], int], torch.Tensor] = {}

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(_REPLY + json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True, "backends": producer.backends})
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            cmd = json.loads(line)
            if cmd["op"] == "publish":
                key = (cmd["dtype"], tuple(cmd["shape"]), cmd["seed"])
                if key not in cache:  # building a 64 MiB random tensor costs more than sending it
                    cache.clear()
                    cache[key] = make_tensor(getattr(torch, key[0]), key[1], key[2])
                try:
                    handle = producer.publish(
                        cache[key], lease_s=cmd.get("lease_s"), peer_host=cmd.get("peer_host")
                    )
                except Exception as e:
                    reply({"error": type(e).__name__, "message": str(e)})
                    continue
                reply({"handle": base64.b64encode(handle.SerializeToString()).decode()})
            elif cmd["op"] == "stats":
                reply({"bytes_in_use": producer.bytes_in_use, "tensors": len(producer.pool)})
            elif cmd["op"] == "release":
                reply({"released": producer.release(cmd["id"])})
    finally:
        await server.stop(grace=None)
        producer.close()


class LoopbackProducer:
    """Parent side: start the child, send commands, signal it. Always `close()` (or use `with`)."""

    def __init__(
        self,
        backend: str,
        *,
        pool_mib: int = 64,
        lease_s: float = 60.0,
        checksum: bool = False,
        shm_prefix: str = "epd-",
        nixl_progress_thread: bool = False,
        host: str = "127.0.0.1",
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        """`host`: the address TensorStore listens on and handles name; `wrap` turns the child's
        command into the one to run (e.g. inside another network namespace)."""
        cmd = [sys.executable, "-m", "common.transfer.loopback", "--backend", backend]
        cmd += ["--pool-mib", str(pool_mib), "--lease-s", str(lease_s), "--host", host]
        cmd += ["--shm-prefix", shm_prefix] + (["--checksum"] if checksum else [])
        cmd += ["--nixl-progress-thread"] if nixl_progress_thread else []
        env = dict(os.environ, UCX_WARN_UNUSED_ENV_VARS="n")
        self.proc = subprocess.Popen(
            wrap(cmd) if wrap else cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.pid = self.proc.pid
        try:
            self.backends: list[str] = self._read()["backends"]
        except BaseException:
            self.close()
            raise

    def publish(
        self,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        seed: int = 0,
        lease_s: float | None = None,
        peer_host: str | None = None,
    ) -> tensor_pb2.TensorHandle:
        """The child's handle; raises RuntimeError("<ErrorClass>: message") if publish failed.
        `peer_host` is the consumer's `host_id()`, as an Encode call carries it."""
        name = str(dtype).removeprefix("torch.")
        reply = self._ask(
            {"op": "publish", "dtype": name, "shape": list(shape), "seed": seed,
             "lease_s": lease_s, "peer_host": peer_host}
        )  # fmt: skip
        if "error" in reply:
            raise RuntimeError(f"{reply['error']}: {reply['message']}")
        return tensor_pb2.TensorHandle.FromString(base64.b64decode(reply["handle"]))

    def stats(self) -> dict[str, int]:
        return self._ask({"op": "stats"})

    def release(self, tensor_id: str) -> bool:
        return bool(self._ask({"op": "release", "id": tensor_id})["released"])

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def close(self) -> None:
        """Ask the child to exit cleanly (it unlinks its segment); kill it if it does not."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> LoopbackProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ask(self, cmd: dict[str, Any]) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(_REPLY):
                return json.loads(line[len(_REPLY) :])
        raise RuntimeError(f"loopback producer exited (rc={self.proc.wait()})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--pool-mib", type=int, default=64)
    parser.add_argument("--lease-s", type=float, default=60.0)
    parser.add_argument("--checksum", action="store_true")
    parser.add_argument("--shm-prefix", default="epd-")
    parser.add_argument("--nixl-progress-thread", action="store_true")
    parser.add_argument("--host", default="127.0.0.1", help="TensorStore's listen address")
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
