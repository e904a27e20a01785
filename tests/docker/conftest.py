"""The compose stack on this machine's Docker engine, for `make test-deploy` (which builds the
image first). `make test` never collects this directory (pyproject's `norecursedirs`).

One stack per session, under its own compose project name; whatever happens (a failed test, an
interrupt), the session ends with `docker compose down -v`, which removes its containers, its
shm volume and its network.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.tiny_model import make_tiny_model
from tests.docker.stack import Stack, docker, down, free_port


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
    # `make test-deploy` names the project, so that its shell can tear it down even if pytest
    # itself is killed.
    stack = Stack(os.environ.get("EPD_COMPOSE_PROJECT", f"epd-test-{os.getpid()}"), env)
    try:
        yield stack
    finally:
        # Also after a failure or an interrupt: nothing of the project may survive the session.
        down(stack.project, env)
