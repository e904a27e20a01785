"""Failures of the engine as a whole (a request's own errors are `ContractError`s)."""

from __future__ import annotations


class EngineFailed(RuntimeError):
    """The engine can run no more forwards (a tensor-parallel rank died or hung): every request
    fails with UNAVAILABLE and the replica exits, to be restarted."""
