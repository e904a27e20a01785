"""Every command the deploy files run parses with the real `epd` CLI: a flag a role does not have
(renamed, not yet written, misspelt) fails here instead of in a crash-looping pod."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import (
    COMPOSE_VARIANTS,
    DEPLOY,
    KUSTOMIZATIONS,
    Doc,
    compose_config,
    edit,
    kustomize,
    parse_epd,
)
from test_k8s import resolve_vars


def k8s_commands(docs: list[Doc]) -> list[tuple[str, list[str]]]:
    """(where, argv after `epd`) of every container, $(VAR)s expanded as the kubelet would."""
    out = []
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        spec = d["spec"]["template"]["spec"]
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            argv = [resolve_vars(d, c, a, docs) for a in [*c.get("command", []), *c["args"]]]
            out.append((f"Deployment/{d['metadata']['name']}/{c['name']}", argv))
    return out


def compose_commands(config: Doc) -> list[tuple[str, list[str]]]:
    out = []
    for name, svc in config["services"].items():
        out.append((f"{name}.command", svc["command"]))
        test = svc.get("healthcheck", {}).get("test", [])
        if test[:2] == ["CMD", "epd"]:
            out.append((f"{name}.healthcheck", test[2:]))
    return out


def parse_errors(commands: list[tuple[str, list[str]]]) -> list[str]:
    errors = []
    for where, argv in commands:
        error = parse_epd(argv)
        if error is not None:
            errors.append(f"{where}: {error}")
    return errors


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_k8s_commands_parse(kustomization: str, rendered: dict[str, list[Doc]]) -> None:
    commands = k8s_commands(rendered[kustomization])
    assert {argv[0] for _, argv in commands} >= {"encoder", "language", "gateway"}
    errors = parse_errors(commands)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("variant", COMPOSE_VARIANTS)
def test_compose_commands_parse(variant: str) -> None:
    commands = compose_commands(compose_config(DEPLOY, COMPOSE_VARIANTS[variant]))
    assert sum(1 for where, _ in commands if where.endswith("healthcheck")) == 3
    errors = parse_errors(commands)
    assert not errors, "\n".join(errors)


def test_broken_copies_fail_to_parse(deploy_copy: Path) -> None:
    edit(deploy_copy / "k8s" / "base" / "language.yaml", "--max-num-seqs=", "--max-seqs=")
    edit(deploy_copy / "compose.yaml", '"--timeout", "4"]', '"--timeout", "soon"]')
    k8s = parse_errors(k8s_commands(kustomize(deploy_copy / "k8s" / "base")))
    assert any("unrecognized arguments: --max-seqs" in e for e in k8s), k8s
    compose = parse_errors(compose_commands(compose_config(deploy_copy, ["compose.yaml"])))
    assert any("health" in e and "invalid float value: 'soon'" in e for e in compose), compose
