"""Structured outputs in the request contract: what a request's output must match (pure Python).

One `StructuredOutput` names one constraint, as vLLM's `structured_outputs` does: a JSON schema,
any JSON object, a regular expression, one of a list of strings, or an EBNF (GBNF) grammar. It is
checked for shape and size when built; whether the schema, regex or grammar compiles is decided
by the language service, which compiles it with xgrammar (`services/language/engine/grammar.py`)
and answers INVALID_ARGUMENT naming the problem. The gateway asks it to (`CompileGrammar`)
before any image is encoded.

`digest` identifies the constraint (kind and text): compiled grammars are cached by it.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from common.contract.errors import ContractError

MAX_SPEC_CHARS = 256 * 1024  # a schema, regex or grammar; the grammar compiler's work grows with it
MAX_CHOICES = 1024
_PARAM = "structured_outputs"  # the OpenAI error's `param`


class ConstraintKind(enum.StrEnum):
    JSON_SCHEMA = "json"  # `spec` is a JSON schema (JSON text)
    JSON_OBJECT = "json_object"  # any JSON object; `spec` is empty
    REGEX = "regex"  # `spec` is a regular expression the whole output matches
    CHOICE = "choice"  # the output is exactly one of `choices`
    GRAMMAR = "grammar"  # `spec` is an EBNF/GBNF grammar whose root rule is `root`


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    kind: ConstraintKind
    spec: str = ""
    choices: tuple[str, ...] = ()
    # JSON schemas: refuse properties the schema does not name (OpenAI's `strict`); xgrammar's
    # default. False lets additionalProperties follow the schema's own rules.
    strict: bool = True
    # Enforce the constraint only after this token has been generated (a reasoning model's
    # end-of-thinking token, `</think>`, when the prompt opens a think block: the reasoning is
    # free, the answer constrained, as vLLM does with a reasoning parser); None = from the first.
    after_token: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, ConstraintKind):
            raise ContractError(f"structured output kind {self.kind!r} is unknown", _PARAM)
        if not isinstance(self.spec, str) or len(self.spec) > MAX_SPEC_CHARS:
            raise ContractError(
                f"structured output {self.kind.value}: at most {MAX_SPEC_CHARS} characters",
                _PARAM,
            )
        textual = (ConstraintKind.JSON_SCHEMA, ConstraintKind.REGEX, ConstraintKind.GRAMMAR)
        if self.kind in textual and not self.spec:
            raise ContractError(f"structured output {self.kind.value} must not be empty", _PARAM)
        if self.kind == ConstraintKind.JSON_SCHEMA:
            try:
                schema = json.loads(self.spec)
            except (json.JSONDecodeError, RecursionError) as e:
                raise ContractError(f"json schema is not valid JSON: {e}", _PARAM) from None
            if not isinstance(schema, dict | bool):
                raise ContractError("a json schema must be an object", _PARAM)
        if self.kind == ConstraintKind.CHOICE:
            if not isinstance(self.choices, tuple) or not self.choices:
                raise ContractError("choice must be a non-empty list of strings", _PARAM)
            if len(self.choices) > MAX_CHOICES:
                raise ContractError(f"choice: at most {MAX_CHOICES} strings", _PARAM)
            if not all(isinstance(c, str) and c for c in self.choices):
                raise ContractError("choice must list non-empty strings", _PARAM)
            if sum(len(c) for c in self.choices) > MAX_SPEC_CHARS:
                raise ContractError(f"choice: at most {MAX_SPEC_CHARS} characters in all", _PARAM)
        elif self.choices:
            raise ContractError("choices are only for kind choice", _PARAM)
        if not isinstance(self.strict, bool):
            raise ContractError("strict must be a boolean", _PARAM)
        at = self.after_token
        if at is not None and (isinstance(at, bool) or not isinstance(at, int) or at < 0):
            raise ContractError("after_token must be a token id", _PARAM)

    @property
    def digest(self) -> str:
        """Hex SHA-256 of everything that changes the compiled grammar (not `after_token`)."""
        text = json.dumps([self.kind.value, self.spec, list(self.choices), self.strict])
        return hashlib.sha256(text.encode()).hexdigest()

    @classmethod
    def json_schema(cls, schema: Any, strict: bool = True) -> StructuredOutput:
        """A JSON schema given as a decoded value (dict) or as JSON text."""
        if isinstance(schema, str):
            return cls(ConstraintKind.JSON_SCHEMA, schema, strict=strict)
        try:
            text = json.dumps(schema, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as e:
            raise ContractError(f"json schema cannot be serialised: {e}", _PARAM) from None
        return cls(ConstraintKind.JSON_SCHEMA, text, strict=strict)
