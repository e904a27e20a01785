"""Make transformers' Qwen3-VL video processor importable as the tests' numerical reference.

transformers' video processors need torchvision. PyPI has no CPU torchvision: 0.28.0 (the release
for torch 2.13) is a CUDA build whose C++ extension cannot load beside the CPU torch wheel. Its
extension loader is built for that (the C++ ops are then marked absent), except that two
`register_fake` lines of `torchvision/_meta_registrations.py` register fake kernels for
`torchvision::nms` / `qnms` unconditionally and fail the import. This installs torchvision
`--no-deps` (torch stays the CPU wheel) and guards those two lines like the file's other
registrations (the shared peer set-up, `peers/vllm-cpu/setup.sh`, does the same). The transforms
the reference uses (resize, normalize) are plain torch ops.

Test environment only: nothing in `common/`, `services/` or `bench/` imports torchvision.
Idempotent; run by `make venv` as `python tests/reference/install_torchvision.py`.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

VERSION = "0.28.0"


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                f"torchvision=={VERSION}",
            ],
            check=True,
        )
        spec = importlib.util.find_spec("torchvision")
    assert spec is not None and spec.origin is not None
    path = Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    for op in ("nms", "qnms"):
        old = f'@torch.library.register_fake("torchvision::{op}")\n'
        new = (
            f'@(torch.library.register_fake("torchvision::{op}") '
            "if torchvision.extension._has_ops() else (lambda fn: fn))\n"
        )
        if old in text:
            text = text.replace(old, new)
        elif new not in text:
            raise SystemExit(f"{path}: no register_fake line for torchvision::{op}")
    path.write_text(text)
    subprocess.run(
        [sys.executable, "-c", "import torchvision.transforms.v2.functional"], check=True
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
