"""The committed stubs in common/rpc/ are exactly what `make proto` generates from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    protos = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "proto").glob("*.proto"))
    assert "proto/tensor.proto" in protos
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-Icommon/rpc=proto"]
    cmd += [f"--{kind}_out={tmp_path}" for kind in ("python", "grpc_python", "pyi")]
    subprocess.run(cmd + protos, cwd=ROOT, check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "protoc generated nothing"
    for rel in generated:
        committed = ROOT / rel
        assert committed.exists(), f"{rel} is not committed; run `make proto`"
        assert committed.read_text() == (tmp_path / rel).read_text(), (
            f"{rel} is stale: run `make proto`"
        )
