"""Registry of transfer backends, imported lazily so that NIXL is loaded only when used."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from common.transfer.errors import BackendUnavailableError

# Backend name (= TensorHandle location field) -> module exposing `Exporter` and `Reader`.
BACKENDS: dict[str, str] = {
    "shm": "common.transfer.backends.shm",
    "nixl": "common.transfer.backends.nixl",
    "grpc": "common.transfer.backends.grpc",
}


def nixl_available() -> bool:
    return importlib.util.find_spec("nixl_cu12") is not None


def load(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise ValueError(f"unknown transfer backend {name!r}; choose from {sorted(BACKENDS)}")
    if name == "nixl" and not nixl_available():
        raise BackendUnavailableError(
            "the nixl backend needs the NIXL package: pip install 'epd[nixl]' (nixl-cu12)"
        )
    return importlib.import_module(BACKENDS[name])
