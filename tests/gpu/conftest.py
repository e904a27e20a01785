"""GPU tests: skipped where CUDA is absent. `tests/gpu/run.sh` runs them with `--confcutdir`, so
this file gives them their own tiny checkpoint instead of the root conftest's fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("gpu-tiny"), preset="tiny", seed=0)
