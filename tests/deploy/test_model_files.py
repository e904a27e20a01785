"""A checkpoint from `epd make-tiny-model` is readable by the image's user (uid 10001): the
safetensors file gets the umask's mode like every other file, not safetensors' own 0600."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from services.tiny_model import make_tiny_model


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_checkpoint_files_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        out = make_tiny_model(tmp_path / "m", preset="tiny")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes
    assert all(m == mode for m in modes.values()), {n: oct(m) for n, m in modes.items()}
