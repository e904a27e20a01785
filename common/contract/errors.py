"""The contract's one error type (pure Python)."""

from __future__ import annotations


class ContractError(ValueError):
    """A value that breaks the request contract; `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
