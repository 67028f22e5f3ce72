"""Structured outputs at the API edge: OpenAI `response_format` and vLLM `structured_outputs` to one
`StructuredOutputs` (seedoss/structured.py), checked against the tokenizer so a bad grammar is a 400 before any
token is generated, and vLLM's removed `guided_*` fields answered with a 400 that names their replacement
(never silently ignored: a client that sends them expects constrained output).
"""

from __future__ import annotations

from typing import Any

from seedoss.structured import StructuredOutputs, check

from .errors import InvalidRequest

# vLLM removed these (0.12) in favour of `structured_outputs`
REMOVED_GUIDED = {
    "guided_json": "structured_outputs.json", "guided_regex": "structured_outputs.regex",
    "guided_choice": "structured_outputs.choice", "guided_grammar": "structured_outputs.grammar",
    "guided_json_object": "structured_outputs.json_object or response_format json_object",
    "guided_decoding_backend": "structured_outputs (this server's backend is llguidance)",
    "guided_whitespace_pattern": "structured_outputs (JSON is generated compact)",
}


def reject_guided(body: dict[str, Any]) -> None:
    for name, replacement in REMOVED_GUIDED.items():
        if name in body:
            raise InvalidRequest(f"{name} was removed (as in vLLM); use {replacement}", param=name)


def from_response_format(response_format: Any) -> StructuredOutputs | None:
    """OpenAI's `response_format`: text (no constraint), json_object, json_schema {name, schema, strict}."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema", {"type": "object"}) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest("response_format.json_schema must be {name, schema, strict?} with an object schema",
                                 param="response_format")
        return StructuredOutputs(json=schema)
    raise InvalidRequest("response_format.type must be text, json_object or json_schema", param="response_format")


def resolve(tokenizer, *, response_format: Any = None, structured_outputs: Any = None,
            grammar: str | None = None) -> dict[str, Any] | None:
    """The one constraint of a request as a `structured_outputs` dict for the native body (None: unconstrained).
    `grammar` is a constraint the server itself adds (tool_choice required / named). Two at once is a 400."""
    given: list[tuple[str, StructuredOutputs]] = []
    rf = from_response_format(response_format)
    if rf is not None:
        given.append(("response_format", rf))
    if structured_outputs is not None:
        try:
            so = structured_outputs if isinstance(structured_outputs, StructuredOutputs) else \
                StructuredOutputs.model_validate(structured_outputs)
        except ValueError as e:
            raise InvalidRequest(_first_error(e), param="structured_outputs") from None
        given.append(("structured_outputs", so))
    if grammar is not None:
        given.append(("tool_choice", StructuredOutputs(grammar=grammar)))
    if not given:
        return None
    if len(given) > 1:
        raise InvalidRequest(f"{given[0][0]} and {given[1][0]} both constrain the output: give one",
                             param=given[1][0])
    param, spec = given[0]
    error = check(spec, tokenizer)
    if error:
        raise InvalidRequest(f"{param}: the grammar does not compile: {error.strip().splitlines()[0]}", param=param)
    return spec.model_dump(by_alias=True, exclude_none=True)


def _first_error(e: ValueError) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        first = errors()[0]
        return str(first.get("msg", e)).replace("Value error, ", "")
    return str(e)
