"""deploy/compose*.yaml: the real Compose v2 `config` accepts them, the compose-spec schema
accepts them, and the services are wired as the design says (scalable encoder, shared /dev/shm,
gRPC health checks, drain shorter than the stop grace period)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import COMPOSE_VARIANTS, DEPLOY, Doc, RenderError, compose_config, edit


def schema_errors(deploy: Path, files: list[str]) -> str:
    """check-jsonschema with its bundled compose-spec schema; '' when every file passes."""
    proc = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         *[str(deploy / f) for f in files]],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return "" if proc.returncode == 0 else proc.stdout + proc.stderr


def _seconds(duration: str) -> float:
    """Compose's normalised durations ('30s', '10m0s', '1h2m3s') in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)([hms])", duration))


def wiring_errors(config: Doc) -> list[str]:
    errors = []
    services = config["services"]
    if set(services) != {"encoder", "language", "gateway"}:
        errors.append(f"services are {sorted(services)}")
        return errors
    for name, svc in services.items():
        cmd = svc["command"]
        if cmd[0] != name:
            errors.append(f"{name}: command runs role {cmd[0]!r}")
        test = svc.get("healthcheck", {}).get("test", [])
        port = cmd[cmd.index("--grpc-port" if name == "gateway" else "--port") + 1]
        if test[:3] != ["CMD", "epd", "health"] or not test[3].endswith(f":{port}"):
            errors.append(f"{name}: healthcheck {test} is not `epd health` on gRPC port {port}")
        grace = float(cmd[cmd.index("--grace-period") + 1])
        if _seconds(svc.get("stop_grace_period", "10s")) <= grace:
            errors.append(f"{name}: stop_grace_period must exceed --grace-period {grace}")
        if not svc.get("restart"):
            errors.append(f"{name}: no restart policy")
        if "memory" not in svc.get("deploy", {}).get("resources", {}).get("limits", {}):
            errors.append(f"{name}: no memory limit")
    enc = services["encoder"]
    # `--scale encoder=N`: no fixed name, no published host port, no fixed replica count.
    if enc.get("container_name") or enc.get("ports") or "replicas" in enc.get("deploy", {}):
        errors.append("encoder cannot be scaled with --scale (container_name/ports/replicas)")
    gw = services["gateway"]["command"]
    if gw[gw.index("--encoders") + 1] != "dns:///encoder:50051":
        errors.append("gateway must find encoder replicas by DNS: --encoders dns:///encoder:50051")
    for name in ("encoder", "language"):
        mounts = {v["target"]: v for v in services[name].get("volumes", [])}
        if mounts.get("/dev/shm", {}).get("source") != "shm":
            errors.append(f"{name}: /dev/shm is not the shared shm volume")
        if "/models" not in mounts:
            errors.append(f"{name}: no model volume at /models")
    if services["encoder"].get("hostname") != services["language"].get("hostname"):
        errors.append("encoder and language need one hostname for the shm transport's host check")
    if config.get("volumes", {}).get("shm", {}).get("driver_opts", {}).get("type") != "tmpfs":
        errors.append("the shm volume must be a tmpfs")
    return errors


@pytest.mark.parametrize("variant", COMPOSE_VARIANTS)
def test_compose_config_and_wiring(variant: str) -> None:
    config = compose_config(DEPLOY, COMPOSE_VARIANTS[variant])
    errors = wiring_errors(config)
    assert not errors, "\n".join(errors)


def test_gpu_variant_reserves_gpus() -> None:
    services = compose_config(DEPLOY, COMPOSE_VARIANTS["gpu"])["services"]
    for name in ("encoder", "language"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"], devices
        assert "--device" in services[name]["command"]
        assert services[name]["command"][services[name]["command"].index("--device") + 1] == "cuda"
    assert "devices" not in services["gateway"]["deploy"]["resources"].get("reservations", {})


@pytest.mark.parametrize("variant", COMPOSE_VARIANTS)
def test_compose_spec_schema(variant: str) -> None:
    errors = schema_errors(DEPLOY, COMPOSE_VARIANTS[variant])
    assert not errors, errors


def test_broken_copy_fails_compose_config(deploy_copy: Path) -> None:
    edit(
        deploy_copy / "compose.yaml",
        '    expose: ["50051", "9090"]',
        '    expos: ["50051", "9090"]',
    )
    with pytest.raises(RenderError, match="'expos' not allowed"):
        compose_config(deploy_copy, ["compose.yaml"])


def test_broken_copy_fails_compose_spec_schema(deploy_copy: Path) -> None:
    edit(deploy_copy / "compose.gpu.yaml", "capabilities: [gpu]", "capabilities: gpu")
    errors = schema_errors(deploy_copy, ["compose.gpu.yaml"])
    assert "capabilities: 'gpu' is not of type 'array'" in errors, errors


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('"127.0.0.1:50051"', '"127.0.0.1:50052"', "encoder: healthcheck"),
        ("dns:///encoder:50051", "encoder:50051", "find encoder replicas by DNS"),
        ("stop_grace_period: 30s", "stop_grace_period: 15s", "stop_grace_period must exceed"),
    ],
)
def test_broken_copy_fails_wiring(deploy_copy: Path, old: str, new: str, expected: str) -> None:
    edit(deploy_copy / "compose.yaml", old, new)
    errors = "\n".join(wiring_errors(compose_config(deploy_copy, ["compose.yaml"])))
    assert expected in errors, errors


def engine_errors(config: Doc) -> list[str]:
    """What Docker Engine 20.10 (Debian 12's docker.io) cannot run, or a small host refuses."""
    errors = []
    for name, svc in config["services"].items():
        if "start_interval" in svc.get("healthcheck", {}):
            errors.append(f"{name}: healthcheck.start_interval needs Engine >= 25")
        if svc.get("build"):
            errors.append(f"{name}: `compose build` needs buildx >= 0.17; `make image` builds")
    return errors


@pytest.mark.parametrize("variant", COMPOSE_VARIANTS)
def test_compose_runs_on_engine_20_10(variant: str) -> None:
    errors = engine_errors(compose_config(DEPLOY, COMPOSE_VARIANTS[variant]))
    assert not errors, "\n".join(errors)


def test_broken_copy_fails_engine_check(deploy_copy: Path) -> None:
    edit(deploy_copy / "compose.yaml", "      start_period: 2m\n",
         "      start_period: 2m\n      start_interval: 5s\n")  # fmt: skip
    errors = "\n".join(engine_errors(compose_config(deploy_copy, ["compose.yaml"])))
    assert "gateway: healthcheck.start_interval" in errors, errors


@pytest.mark.parametrize("variant", COMPOSE_VARIANTS)
def test_cpu_limits_and_user_come_from_the_environment(variant: str) -> None:
    # Unset: no CPU limit (Docker refuses a limit above the host's cores), the image's uid.
    for svc in compose_config(DEPLOY, COMPOSE_VARIANTS[variant])["services"].values():
        assert float(svc["deploy"]["resources"]["limits"].get("cpus", 0)) == 0
        assert svc["user"] == "10001:10001"
    settings = {"EPD_ENCODER_CPUS": "1.5", "EPD_LANGUAGE_CPUS": "2", "EPD_GATEWAY_CPUS": "0.5",
                "EPD_USER": "1000:1000", "EPD_HEALTH_INTERVAL": "3s"}  # fmt: skip
    services = compose_config(DEPLOY, COMPOSE_VARIANTS[variant], settings)["services"]
    for name, cpus in (("encoder", 1.5), ("language", 2.0), ("gateway", 0.5)):
        assert float(services[name]["deploy"]["resources"]["limits"]["cpus"]) == cpus, name
        assert services[name]["user"] == "1000:1000"
        assert services[name]["healthcheck"]["interval"] == "3s"


@pytest.mark.parametrize("variant", COMPOSE_VARIANTS)
def test_encoders_wait_passively_on_the_shared_host(variant: str) -> None:
    services = compose_config(DEPLOY, COMPOSE_VARIANTS[variant])["services"]
    assert services["encoder"]["environment"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in (services["language"].get("environment") or {})
    own_host = {"EPD_ENCODER_OMP_WAIT_POLICY": "ACTIVE"}
    services = compose_config(DEPLOY, COMPOSE_VARIANTS[variant], own_host)["services"]
    assert services["encoder"]["environment"]["OMP_WAIT_POLICY"] == "ACTIVE"
