"""deploy/Dockerfile: hadolint at warning level, plus the properties the design asks for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import DEPLOY, edit, run_tool, tool


def hadolint(path: Path) -> str:
    """hadolint's findings at warning level and above; '' when it passes."""
    proc = run_tool([tool("hadolint"), "--no-color", "--failure-threshold", "warning", str(path)])
    return "" if proc.returncode == 0 else proc.stdout + proc.stderr


def design_errors(path: Path) -> list[str]:
    text = path.read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    froms = [ln for ln in lines if ln.upper().startswith("FROM ")]
    errors = []
    if len(froms) < 2:
        errors.append("not multi-stage")
    if not re.search(r"^ARG BASE_IMAGE=\S+:\S+", text, re.M) or "FROM ${BASE_IMAGE}" not in text:
        errors.append("base image must be a pinned build argument BASE_IMAGE")
    if re.search(r"^\s*HEALTHCHECK\b", text, re.M | re.I):
        errors.append("HEALTHCHECK present: probes belong to the orchestrator")
    users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
    if not users or users[-1].split(":")[0] in ("0", "root") or not users[-1][0].isdigit():
        errors.append("the final user must be a numeric non-root uid")
    if 'ENTRYPOINT ["epd"]' not in lines:
        errors.append('ENTRYPOINT must be ["epd"]: the role is the command')
    if "/dev/shm" not in text:
        errors.append("/dev/shm use is not documented")
    if "torch==${TORCH_VERSION}" not in text:
        errors.append("torch must be installed first at an exact version")
    # Offline build: everything comes from the wheelhouse, nothing from an index or the sources.
    code = "\n".join(lines)
    installs = re.findall(r"pip install[^&]*", code)
    if not installs or any("--no-index" not in i for i in installs):
        errors.append("every pip install must use --no-index (the build has no network)")
    if re.search(r"^COPY (common|services|bench|pyproject)", code, re.M):
        errors.append("the image installs the epd wheel, not a copy of the sources")
    compiles = re.findall(r"compileall[^&]*", code)
    if not compiles or "py312_intrinsics" not in compiles[0]:
        errors.append("compileall must skip torch's Python 3.12 test file (exits 1 under 3.11)")
    return errors


def test_hadolint_passes() -> None:
    findings = hadolint(DEPLOY / "Dockerfile")
    assert not findings, findings


def test_design() -> None:
    errors = design_errors(DEPLOY / "Dockerfile")
    assert not errors, errors


@pytest.mark.parametrize(
    ("old", "new", "rule"),
    [
        ('"torch==${TORCH_VERSION}"', "torch", "DL3013"),  # unpinned pip install
        ("WORKDIR /wheels", "RUN cd /wheels", "DL3003"),
        ("USER 10001:10001", "USER root", "DL3002"),
    ],
)
def test_broken_copy_fails_hadolint(deploy_copy: Path, old: str, new: str, rule: str) -> None:
    edit(deploy_copy / "Dockerfile", old, new)
    assert rule in hadolint(deploy_copy / "Dockerfile")


def test_broken_copy_fails_offline_design(deploy_copy: Path) -> None:
    edit(deploy_copy / "Dockerfile", "--no-index --no-deps ./app", "--no-deps ./app")
    edit(deploy_copy / "Dockerfile", "|py312_intrinsics\\.py", "")
    errors = "\n".join(design_errors(deploy_copy / "Dockerfile"))
    for expected in ("--no-index", "3.12 test file"):
        assert expected in errors, errors


def test_broken_copy_fails_design(deploy_copy: Path) -> None:
    # hadolint cannot see through a build argument's default: the design check must.
    edit(deploy_copy / "Dockerfile", "BASE_IMAGE=python:3.11.14-slim-bookworm", "BASE_IMAGE=python")
    edit(deploy_copy / "Dockerfile", 'ENTRYPOINT ["epd"]', 'HEALTHCHECK CMD ["epd", "--help"]')
    errors = "\n".join(design_errors(deploy_copy / "Dockerfile"))
    for expected in ("pinned build argument", "HEALTHCHECK present", "ENTRYPOINT"):
        assert expected in errors, errors
