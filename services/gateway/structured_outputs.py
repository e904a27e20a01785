"""A request's structured-output constraint, from any of the spellings vLLM users send.

- OpenAI's `response_format`: `{"type": "text"}` (none), `{"type": "json_object"}`,
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`;
- vLLM's `structured_outputs`: exactly one of `json` (a schema, as an object or JSON text),
  `regex`, `choice` (a list of strings), `grammar` (EBNF/GBNF), `json_object` (true);
- vLLM's older top-level `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.

One request names at most one constraint. Only shapes are checked here (the gateway imports no
xgrammar, which imports torch): whether a schema, regex or grammar compiles is answered by the
language replica that will run it (`Language.CompileGrammar`), before any image is encoded.
"""

from __future__ import annotations

from typing import Any

from common.contract import ConstraintKind, ContractError, StructuredOutput

# vLLM's StructuredOutputsParams fields besides the constraint, accepted with their neutral
# values (its backend knobs do not apply: epd has one backend).
_NEUTRAL_OPTIONS: dict[str, tuple[Any, ...]] = {
    "backend": (None, "auto", "xgrammar"),
    "disable_fallback": (None, False, True),
    "disable_any_whitespace": (None, False, True),
    "disable_additional_properties": (None, False),
    "whitespace_pattern": (None,),
    "structural_tag": (None,),
}
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}  # fmt: skip


class SpecError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def parse_structured(body: dict[str, Any]) -> StructuredOutput | None:
    """The request's constraint, or None; raises SpecError (400) naming the field."""
    found: list[tuple[str, StructuredOutput]] = []
    rf = body.get("response_format")
    if rf is not None:
        spec = _response_format(rf)
        if spec is not None:
            found.append(("response_format", spec))
    so = body.get("structured_outputs")
    if so is not None:
        found.append(("structured_outputs", _structured_outputs(so)))
    for name, key in _GUIDED.items():
        if body.get(name) is not None:
            found.append((name, _one(key, body[name], name)))
    backend = body.get("guided_decoding_backend")
    if backend not in (None, "auto", "xgrammar"):
        raise SpecError("guided_decoding_backend: this server has one backend, xgrammar",
                        "guided_decoding_backend")  # fmt: skip
    if len(found) > 1:
        names = ", ".join(n for n, _ in found)
        raise SpecError(f"at most one structured-output constraint per request, got {names}",
                        found[1][0])  # fmt: skip
    return found[0][1] if found else None


def _response_format(rf: Any) -> StructuredOutput | None:
    where = "response_format"
    if not isinstance(rf, dict):
        raise SpecError("response_format must be an object", where)
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _built(lambda: StructuredOutput(ConstraintKind.JSON_OBJECT), where)
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise SpecError("response_format.json_schema must be an object", where)
        schema = js.get("schema", js.get("json_schema"))
        if schema is None:
            raise SpecError("response_format.json_schema.schema is required", where)
        if not isinstance(schema, dict):
            raise SpecError("response_format.json_schema.schema must be an object", where)
        strict = js.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise SpecError("response_format.json_schema.strict must be a boolean", where)
        name = js.get("name")
        if name is not None and not isinstance(name, str):
            raise SpecError("response_format.json_schema.name must be a string", where)
        return _built(lambda: StructuredOutput.json_schema(schema, strict is not False), where)
    raise SpecError("response_format.type must be text, json_object or json_schema", where)


def _structured_outputs(so: Any) -> StructuredOutput:
    where = "structured_outputs"
    if not isinstance(so, dict):
        raise SpecError("structured_outputs must be an object", where)
    for name, value in so.items():
        if name in ("json", "regex", "choice", "grammar", "json_object"):
            continue
        if name not in _NEUTRAL_OPTIONS:
            raise SpecError(f"structured_outputs.{name} is not supported", where)
        if not any(type(value) is type(v) and value == v for v in _NEUTRAL_OPTIONS[name]):
            raise SpecError(f"structured_outputs.{name} is not supported by this server", where)
    given = [k for k in ("json", "regex", "choice", "grammar") if so.get(k) is not None]
    if so.get("json_object") not in (None, False):
        if so["json_object"] is not True:
            raise SpecError("structured_outputs.json_object must be a boolean", where)
        given.append("json_object")
    if len(given) != 1:
        raise SpecError("structured_outputs takes exactly one of json, regex, choice, grammar, "
                        "json_object", where)  # fmt: skip
    if given[0] == "json_object":
        return StructuredOutput(ConstraintKind.JSON_OBJECT)
    return _one(given[0], so[given[0]], where)


def _one(key: str, value: Any, where: str) -> StructuredOutput:
    if key == "json":
        if isinstance(value, str):
            return _built(lambda: StructuredOutput.json_schema(value), where)
        if not isinstance(value, dict):
            raise SpecError(f"{where}: a json schema must be an object or JSON text", where)
        return _built(lambda: StructuredOutput.json_schema(value), where)
    if key == "choice":
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise SpecError(f"{where}: choice must be a list of strings", where)
        return _built(lambda: StructuredOutput(ConstraintKind.CHOICE, choices=tuple(value)), where)
    if not isinstance(value, str):
        raise SpecError(f"{where}: {key} must be a string", where)
    kind = ConstraintKind.REGEX if key == "regex" else ConstraintKind.GRAMMAR
    return _built(lambda: StructuredOutput(kind, value), where)


def _built(make: Any, where: str) -> StructuredOutput:
    try:
        return make()  # type: ignore[no-any-return]
    except ContractError as e:
        raise SpecError(str(e), where) from None
