"""The roles on separate hosts (network namespaces on a bridge, bench/netns.py), for
tests/multihost: each role a real `epd` process on its own host and address, a client host that
talks to the gateway over the bridge with the official openai client (tests/multihost/client.py).
`close()` kills every process and removes every namespace, bridge and rule."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.netns import Fabric, Host
from tests.e2e.serving import EPD, wait_serving

ENCODER_PORT, LANGUAGE_PORT, GATEWAY_HTTP, GATEWAY_GRPC, METRICS = 50051, 50061, 8000, 50071, 9090


class Cluster:
    def __init__(self, model: Path, transport: str, encoders: int = 1, languages: int = 1):
        self.model, self.transport = model, transport
        self.encoders = [f"enc{i}" for i in range(encoders)]
        self.languages = [f"lang{i}" for i in range(languages)]
        self.net = Fabric([*self.encoders, *self.languages, "gateway", "client"])
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.logs: dict[str, list[str]] = {}
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> Host:
        return self.net[name]

    @property
    def base_url(self) -> str:
        return f"http://{self['gateway'].address}:{GATEWAY_HTTP}/v1"

    def _start(self) -> None:
        common = ["--model", str(self.model), "--host", "0.0.0.0", "--metrics-port", str(METRICS)]
        for name in self.encoders:
            self._spawn(name, ["encoder", *common, "--port", str(ENCODER_PORT),
                               "--transport", self.transport, "--pool-bytes", str(64 << 20),
                               "--advertise-host", self[name].address])  # fmt: skip
        for name in self.languages:
            self._spawn(name, ["language", *common, "--port", str(LANGUAGE_PORT),
                               "--kv-cache-bytes", str(16 << 20),
                               "--pull-timeout", "10"])  # fmt: skip
        for name in [*self.encoders, *self.languages]:
            wait_serving(self.procs[name], self.logs[name], timeout=180)
        encoders = ",".join(f"{self[n].address}:{ENCODER_PORT}" for n in self.encoders)
        languages = ",".join(f"{self[n].address}:{LANGUAGE_PORT}" for n in self.languages)
        self._spawn("gateway", ["gateway", *common, "--encoders", encoders,
                                "--language", languages, "--http-port", str(GATEWAY_HTTP),
                                "--grpc-port", str(GATEWAY_GRPC)])  # fmt: skip
        wait_serving(self.procs["gateway"], self.logs["gateway"], timeout=120)

    def _spawn(self, host: str, argv: list[str]) -> None:
        self.logs[host] = []
        self.procs[host] = subprocess.Popen(
            # UCX logs to stdout: into stderr with the rest, which wait_serving's reader drains.
            self[host].argv(["sh", "-c", 'exec "$@" 1>&2', "sh", EPD, *argv]),
            stderr=subprocess.PIPE,
            text=True,
        )

    def client(self, *args: str, timeout: float = 180) -> Any:
        """Run tests/multihost/client.py on the client host; its JSON answer."""
        argv = self["client"].argv([sys.executable, "-m", "tests.multihost.client", *args])
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"client {args} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def chat(self, n: int, seed: int, concurrency: int = 2, timeout_s: float = 40) -> list[Any]:
        """`n` image+text chats with distinct images; one result per request."""
        results: list[Any] = self.client(
            "chat", self.base_url, str(n), str(seed), str(concurrency), str(timeout_s)
        )
        return results

    def start_chat(self, n: int, seed: int, concurrency: int, timeout_s: float) -> Any:
        argv = self["client"].argv([sys.executable, "-m", "tests.multihost.client", "chat",
                                    self.base_url, str(n), str(seed), str(concurrency),
                                    str(timeout_s)])  # fmt: skip
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def metric(self, host: str, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample of `host`'s /metrics (summed over the series matching `labels`), read from
        the client host across the bridge."""
        url = f"http://{self[host].address}:{METRICS}/metrics"
        value: float = self.client("metric", url, name, json.dumps(labels or {}), timeout=30)
        return value

    def wait_metric(self, host: str, name: str, above: float, timeout: float = 30) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = self.metric(host, name)
            if value > above:
                return value
            time.sleep(0.2)
        raise AssertionError(f"{host} {name} stayed at {above} for {timeout} s")

    def close(self) -> None:
        """Every process killed, every namespace (with its veth, bridge port and rules) gone."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        self.net.close()
        for proc in self.procs.values():
            proc.wait(timeout=30)
            if proc.stderr is not None:
                proc.stderr.close()

    def log(self, host: str) -> str:
        return "".join(self.logs.get(host, []))[-4000:]
