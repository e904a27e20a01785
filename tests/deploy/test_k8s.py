"""deploy/k8s: every kustomization renders, every object passes the strict Kubernetes 1.32 (and
KEDA) schemas, and the objects agree with each other and with what the services export."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import KUSTOMIZATIONS, Doc, RenderError, SchemaValidator, edit, kustomize

MetricNames = Callable[[str], set[str]]
_PROM_NAME = re.compile(r"\b(epd_[a-z0-9_]+)\b")
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _pod_spec(doc: Doc) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def _containers(doc: Doc) -> list[dict[str, Any]]:
    spec = _pod_spec(doc)
    return [*spec.get("initContainers", []), *spec["containers"]]


def _ports(container: dict[str, Any]) -> dict[str | int, int]:
    """Every way to refer to a container port: its number and its name."""
    out: dict[str | int, int] = {}
    for p in container.get("ports", []):
        out[p["containerPort"]] = p["containerPort"]
        if "name" in p:
            out[p["name"]] = p["containerPort"]
    return out


def _flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a.startswith(f"{name}="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(args):
            return args[i + 1]
    return None


def _image_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" in last and last.rsplit(":", 1)[1] not in ("", "latest")


def resolve_vars(doc: Doc, container: dict[str, Any], text: str, docs: list[Doc]) -> str:
    """Expand $(VAR) as the kubelet does, from env values, fieldRefs (a stand-in address) and
    envFrom ConfigMaps; an undefined VAR stays literal (kubelet behaviour), for checks to see."""
    env: dict[str, str] = {}
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    for src in container.get("envFrom", []):
        ref = src.get("configMapRef", {}).get("name")
        if ref in configmaps:
            env.update(configmaps[ref].get("data", {}))
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = "10.0.0.1"
    return _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def cross_ref_errors(docs: list[Doc], metric_names: MetricNames) -> list[str]:
    """Mistakes no schema sees: dangling references between objects, ports, metrics, images."""
    errors: list[str] = []
    by_kind: dict[str, dict[str, Doc]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    deployments = by_kind.get("Deployment", {})

    for name, dep in deployments.items():
        where = f"Deployment/{name}"
        labels = dep["spec"]["template"]["metadata"].get("labels", {})
        selector = dep["spec"]["selector"].get("matchLabels", {})
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            errors.append(f"{where}: selector {selector} does not match its pod labels {labels}")
        spec = _pod_spec(dep)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            claim = v.get("persistentVolumeClaim", {}).get("claimName")
            if claim and claim not in by_kind.get("PersistentVolumeClaim", {}):
                errors.append(f"{where}: volume {v['name']} claims missing PVC {claim}")
        for c in _containers(dep):
            cwhere = f"{where} container {c['name']}"
            if not _image_pinned(c["image"]):
                errors.append(f"{cwhere}: image {c['image']} is not pinned (tag or digest)")
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    errors.append(f"{cwhere}: mounts undefined volume {m['name']}")
            for src in c.get("envFrom", []):
                ref = src.get("configMapRef", {}).get("name")
                if ref and ref not in by_kind.get("ConfigMap", {}):
                    errors.append(f"{cwhere}: envFrom missing ConfigMap {ref}")
            for arg in [*c.get("command", []), *c.get("args", [])]:
                for var in _VAR_REF.findall(resolve_vars(dep, c, arg, docs)):
                    errors.append(f"{cwhere}: $({var}) in {arg!r} is not defined in its env")
            ports = _ports(c)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                p = c.get(probe)
                if p is None:
                    continue
                handler = p.get("grpc") or p.get("httpGet") or p.get("tcpSocket") or {}
                if "port" in handler and handler["port"] not in ports:
                    errors.append(f"{cwhere}: {probe} port {handler['port']} is not exposed")
        main = spec["containers"][0]
        if not {"readinessProbe", "livenessProbe", "startupProbe"} <= main.keys():
            errors.append(f"{where}: needs startup, readiness and liveness probes")
        # The pod must outlive preStop + the server's own drain, else in-flight calls are cut.
        grace = _flag(resolve_vars(dep, main, " ".join(main.get("args", [])), docs).split(),
                      "--grace-period")  # fmt: skip
        sleep = main.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        total = spec.get("terminationGracePeriodSeconds", 30)
        if grace is None or float(grace) + sleep >= total:
            errors.append(
                f"{where}: terminationGracePeriodSeconds {total} must exceed preStop {sleep} s "
                f"+ --grace-period {grace}"
            )

    for name, svc in by_kind.get("Service", {}).items():
        selector = svc["spec"].get("selector", {})
        targets = [
            d for d in deployments.values()
            if selector and all(
                d["spec"]["template"]["metadata"].get("labels", {}).get(k) == v
                for k, v in selector.items()
            )
        ]  # fmt: skip
        if not targets:
            errors.append(f"Service/{name}: selector {selector} matches no Deployment's pods")
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            for d in targets:
                if not any(target in _ports(c) for c in _pod_spec(d)["containers"]):
                    errors.append(
                        f"Service/{name}: targetPort {target} is not a port of "
                        f"Deployment/{d['metadata']['name']}"
                    )

    for name, pdb in by_kind.get("PodDisruptionBudget", {}).items():
        selector = pdb["spec"]["selector"].get("matchLabels", {})
        if not any(
            all(
                d["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items()
            )
            for d in deployments.values()
        ):
            errors.append(f"PodDisruptionBudget/{name}: selects no Deployment's pods")

    def role_metrics(target: str, where: str) -> set[str] | None:
        dep = deployments.get(target)
        if dep is None:
            errors.append(f"{where}: targets missing Deployment/{target}")
            return None
        role = dep["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        return metric_names(role)

    for name, hpa in by_kind.get("HorizontalPodAutoscaler", {}).items():
        where = f"HorizontalPodAutoscaler/{name}"
        spec = hpa["spec"]
        if spec.get("minReplicas", 1) > spec["maxReplicas"]:
            errors.append(f"{where}: minReplicas > maxReplicas")
        exported = role_metrics(spec["scaleTargetRef"]["name"], where)
        for m in spec.get("metrics", []):
            metric = m.get("pods", m.get("object", {})).get("metric", {}).get("name")
            if metric and exported is not None and metric not in exported:
                errors.append(f"{where}: metric {metric} is not exported by its target's role")

    for name, so in by_kind.get("ScaledObject", {}).items():
        where = f"ScaledObject/{name}"
        spec = so["spec"]
        if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
            errors.append(f"{where}: minReplicaCount > maxReplicaCount")
        if name in by_kind.get("HorizontalPodAutoscaler", {}):
            errors.append(f"{where}: an HPA of the same target would fight KEDA's own HPA")
        exported = role_metrics(spec["scaleTargetRef"]["name"], where)
        for trigger in spec["triggers"]:
            query = trigger.get("metadata", {}).get("query", "")
            names = _PROM_NAME.findall(query)
            if trigger["type"] == "prometheus" and not names:
                errors.append(f"{where}: query {query!r} names no epd metric")
            for metric in names:
                if exported is not None and metric not in exported:
                    errors.append(f"{where}: {metric} is not exported by its target's role")
    return errors


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renders_and_passes_strict_schemas(
    kustomization: str, rendered: dict[str, list[Doc]], schemas: SchemaValidator
) -> None:
    docs = rendered[kustomization]
    assert docs, f"{kustomization} rendered nothing"
    errors = schemas.errors(docs)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_cross_references(
    kustomization: str, rendered: dict[str, list[Doc]], metric_names: MetricNames
) -> None:
    errors = cross_ref_errors(rendered[kustomization], metric_names)
    assert not errors, "\n".join(errors)


def test_each_role_scales_on_its_own_signal(rendered: dict[str, list[Doc]]) -> None:
    def signals(docs: list[Doc]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for d in docs:
            if d["kind"] == "HorizontalPodAutoscaler":
                names = {
                    m.get("pods", {}).get("metric", {}).get("name")
                    or m.get("resource", {}).get("name")
                    for m in d["spec"]["metrics"]
                }
                out[d["spec"]["scaleTargetRef"]["name"]] = {str(n) for n in names}
            if d["kind"] == "ScaledObject":
                queries = " ".join(t["metadata"]["query"] for t in d["spec"]["triggers"])
                out[d["spec"]["scaleTargetRef"]["name"]] = set(_PROM_NAME.findall(queries))
        return out

    for kustomization in ("base", "overlays/keda"):
        s = signals(rendered[kustomization])
        assert {"encoder", "language", "gateway"} <= s.keys(), (kustomization, s)
        assert all(n.startswith(("epd_encoder_", "epd_transfer_")) for n in s["encoder"]), s
        assert all(n.startswith("epd_language_") for n in s["language"]), s
    kinds = [d["kind"] for d in rendered["overlays/keda"]]
    assert kinds.count("ScaledObject") == 2 and kinds.count("HorizontalPodAutoscaler") == 1


def test_overlays_do_what_they_say(rendered: dict[str, list[Doc]]) -> None:
    def deployment(kustomization: str, name: str) -> Doc:
        docs = rendered[kustomization]
        return next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name)

    def config(kustomization: str) -> dict[str, str]:
        docs = rendered[kustomization]
        data: dict[str, str] = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
        return data

    # Base: pods are reached by IP (headless), advertise it for the transfer layer.
    enc = deployment("base", "encoder")["spec"]["template"]["spec"]["containers"][0]
    assert any(e["name"] == "POD_IP" and e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
               for e in enc["env"])  # fmt: skip
    assert config("base")["EPD_TRANSPORT"] == "grpc"
    # gpu: whole GPUs, requests = limits, NIXL.
    assert config("overlays/gpu")["EPD_TRANSPORT"] == "nixl"
    for role in ("encoder", "language"):
        res = deployment("overlays/gpu", role)["spec"]["template"]["spec"]["containers"][0][
            "resources"
        ]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"], res
    # gpu-tp8: one rank per GPU of the pod, whole experts per rank.
    assert config("overlays/gpu")["EPD_TENSOR_PARALLEL_SIZE"] == "1"
    assert config("overlays/gpu-tp8")["EPD_TENSOR_PARALLEL_SIZE"] == "8"
    lang = deployment("overlays/gpu-tp8", "language")["spec"]["template"]["spec"]["containers"][0]
    assert lang["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert "--tensor-parallel-size=$(EPD_TENSOR_PARALLEL_SIZE)" in lang["args"]
    assert lang["args"][-1] == "--enable-expert-parallel"
    # cpu-dev: no PVC, the model is generated by an init container.
    assert not [d for d in rendered["overlays/cpu-dev"] if d["kind"] == "PersistentVolumeClaim"]
    init = deployment("overlays/cpu-dev", "language")["spec"]["template"]["spec"]["initContainers"]
    assert init[0]["args"][0] == "make-tiny-model"


# --- the tests can fail: deliberately broken copies ---------------------------------------------

SCHEMA_BREAKS = {
    # (file under deploy/k8s, old, new, substrings every one of which the errors must contain)
    "wrong type and unknown fields, all listed": (
        "base/encoder.yaml",
        "  replicas: 2\n",
        "  replicas: two\n  replicaz: 3\n",
        ["spec.replicas: 'two' is not of type", "'replicaz' was unexpected"],
    ),
    "named gRPC probe port": (
        "base/language.yaml",
        "grpc: {port: 50061}\n            periodSeconds: 5",
        "grpc: {port: grpc}\n            periodSeconds: 5",
        ["readinessProbe.grpc.port: 'grpc' is not of type 'integer'"],
    ),
    "KEDA field typo and wrong type": (
        "components/keda/scaledobjects.yaml",
        "  minReplicaCount: 1\n  maxReplicaCount: 16",
        "  minReplicaCount: one\n  maxReplicaCoun: 16",
        ["minReplicaCount: 'one' is not valid", "'maxReplicaCoun' was unexpected"],
    ),
}


@pytest.mark.parametrize("case", SCHEMA_BREAKS)
def test_broken_copy_fails_schema(case: str, deploy_copy: Path, schemas: SchemaValidator) -> None:
    file, old, new, expected = SCHEMA_BREAKS[case]
    edit(deploy_copy / "k8s" / file, old, new)
    docs = kustomize(deploy_copy / "k8s" / "overlays" / "keda")
    errors = "\n".join(schemas.errors(docs))
    for text in expected:
        assert text in errors, errors


CROSS_REF_BREAKS = {
    "Service selects no pods": (
        "base/encoder.yaml",
        "  clusterIP: None\n  selector:\n    app.kubernetes.io/name: epd\n"
        "    app.kubernetes.io/component: encoder",
        "  clusterIP: None\n  selector:\n    app.kubernetes.io/name: epd\n"
        "    app.kubernetes.io/component: encodr",
        "Service/encoder-headless: selector",
    ),
    "probe on a port the container lacks": (
        "base/encoder.yaml",
        "grpc: {port: 50051}\n            periodSeconds: 10\n            timeoutSeconds",
        "grpc: {port: 50052}\n            periodSeconds: 10\n            timeoutSeconds",
        "livenessProbe port 50052 is not exposed",
    ),
    "Service targetPort the container lacks": (
        "base/gateway.yaml",
        "targetPort: http",
        "targetPort: https",
        "targetPort https is not a port",
    ),
    "HPA on a metric the role does not export": (
        "base/language.yaml",
        "metric: {name: epd_language_waiting_requests}",
        "metric: {name: epd_language_waiting}",
        "metric epd_language_waiting is not exported",
    ),
    "HPA targets a missing Deployment": (
        "base/gateway.yaml",
        "kind: Deployment, name: gateway}",
        "kind: Deployment, name: gateway-v2}",
        "targets missing Deployment/gateway-v2",
    ),
    "ScaledObject query on another role's metric": (
        "components/keda/scaledobjects.yaml",
        "query: sum(epd_language_waiting_requests)",
        "query: sum(epd_encoder_queue_depth)",
        "epd_encoder_queue_depth is not exported by its target's role",
    ),
    "image on latest": (
        "base/kustomization.yaml",
        "newTag: 0.1.0-cpu",
        "newTag: latest",
        "is not pinned",
    ),
    "undefined $(VAR) in args": (
        "base/encoder.yaml",
        "--device=$(EPD_DEVICE)",
        "--device=$(EPD_DEVIC)",
        "$(EPD_DEVIC)",
    ),
    "termination grace shorter than the drain": (
        "base/language.yaml",
        "terminationGracePeriodSeconds: 45",
        "terminationGracePeriodSeconds: 25",
        "terminationGracePeriodSeconds 25 must exceed",
    ),
}


@pytest.mark.parametrize("case", CROSS_REF_BREAKS)
def test_broken_copy_fails_cross_references(
    case: str, deploy_copy: Path, schemas: SchemaValidator, metric_names: MetricNames
) -> None:
    file, old, new, expected = CROSS_REF_BREAKS[case]
    edit(deploy_copy / "k8s" / file, old, new)
    errors = []
    for kustomization in ("base", "overlays/keda"):  # keda replaces two of the base's HPAs
        docs = kustomize(deploy_copy / "k8s" / kustomization)
        assert not schemas.errors(docs)  # schema-valid: only the cross-reference check sees it
        errors += cross_ref_errors(docs, metric_names)
    assert expected in "\n".join(errors), "\n".join(errors)


def test_broken_copy_fails_to_render(deploy_copy: Path) -> None:
    (deploy_copy / "k8s" / "base" / "gateway.yaml").unlink()
    with pytest.raises(RenderError, match="gateway.yaml"):
        kustomize(deploy_copy / "k8s" / "overlays" / "cpu-dev")


def test_encoders_wait_passively_in_every_kustomization(rendered: dict[str, list[Doc]]) -> None:
    for kustomization, docs in rendered.items():
        for d in docs:
            if d["kind"] != "Deployment":
                continue
            env = {e["name"]: e.get("value") for c in _containers(d) for e in c.get("env", [])}
            role = d["metadata"]["name"]
            want = "PASSIVE" if role == "encoder" else None
            assert env.get("OMP_WAIT_POLICY") == want, (kustomization, role)
