"""Seed-OSS tool calls: request checks and parsing of generated calls into OpenAI `tool_calls`.

The model writes calls as
`<seed:tool_call>\\n<function=NAME>\\n<parameter=ARG>value</parameter>\\n</function>\\n</seed:tool_call>` (several
blocks for parallel calls, several functions per block allowed). Parsing follows vLLM's `seed_oss` tool parser:
a value loses one leading and one trailing newline, `null` is None, and values are cast by the JSON-schema type of
the tool's parameter (integer, number, boolean, object/array via JSON then Python-literal syntax, else string);
a parameter the schema does not know stays a string. Unlike vLLM (0.32; tests/vllm/test_parsers_match_vllm.py
asserts each difference), a block that names no function, a function that is not among the request's tools, a
malformed block (unclosed `<function=` or `<parameter=` tag) or `<function=` without the wrapper is not a call: its
text stays content (clients never get a call to a function they did not offer); text after a call stays content;
a parameter cut off at the end keeps its value so far; Python-literal objects/arrays are parsed (vLLM 0.32 keeps
the string; its earlier seed_oss parser parsed them too). Content is the text outside the call blocks, less the
whitespace right before a call and, when there are calls, at the end.

As with reasoning (services/reasoning.py), one state machine serves streaming and whole outputs, so both agree at
any split of the text. A call is emitted whole once its block closes (one tool-call delta carrying id, name and
the complete JSON arguments, which OpenAI clients accumulate like any other).
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from typing import Any

from .errors import InvalidRequest
from .reasoning import partial_tag_suffix

CALL_START = "<seed:tool_call>"
CALL_END = "</seed:tool_call>"
_FUNCTION = re.compile(r"<function=(.*?)</function>|<function=(.*)$", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=(.*?)</parameter>|<parameter=(.*?)$", re.DOTALL)


def check_tools(tools: Any, tool_choice: Any) -> tuple[list[dict], str | None]:
    """Validate OpenAI `tools` / `tool_choice`; returns (tools, choice) where choice is None (auto), "none",
    "required" or a function name. A bad value is a 400 naming the field."""
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be a list of function tools", param="tools")
    names = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(function, dict)
                and isinstance(function.get("name"), str) and function["name"]):
            raise InvalidRequest(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}",
                                 param="tools")
        parameters = function.get("parameters")
        properties = (parameters or {}).get("properties") if isinstance(parameters, dict) else None
        required = (parameters or {}).get("required") if isinstance(parameters, dict) else None
        if parameters is not None and not (
                isinstance(parameters, dict) and isinstance(properties or {}, dict)
                and all(isinstance(spec, dict) for spec in (properties or {}).values())
                and isinstance(required or [], list) and all(isinstance(r, str) for r in required or [])):
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON schema object whose properties "
                                 "are schema objects and whose required is a list of names", param="tools")
        names.append(function["name"])
    if tool_choice is None or tool_choice == "auto":
        return tools, None
    if tool_choice == "none":
        return tools, "none"
    if tool_choice == "required":
        if not tools:
            raise InvalidRequest("tool_choice 'required' needs tools", param="tool_choice")
        return tools, "required"
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not (isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and isinstance(name, str)):
        raise InvalidRequest("tool_choice must be 'none', 'auto', 'required' or "
                             "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")
    if name not in names:
        raise InvalidRequest(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
    return tools, name


def _schema_type(spec: Any) -> str:
    kind = spec.get("type", "string") if isinstance(spec, dict) else "string"
    if isinstance(kind, list):  # ["integer", "null"]: the first non-null type
        kind = next((k for k in kind if k != "null"), "string")
    return str(kind).strip().lower()


def cast_value(value: str, spec: Any) -> Any:
    """A parameter's text as the JSON value its schema asks for (vLLM's rules; what cannot be cast stays text)."""
    if value.lower() == "null":
        return None
    kind = _schema_type(spec)
    if kind in ("string", "str", "text", "varchar", "char", "enum"):
        return value
    if kind.startswith(("int", "uint", "long", "short", "unsigned")):
        try:
            return int(value)
        except ValueError:
            return value
    if kind.startswith(("num", "float")):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() else number
    if kind in ("boolean", "bool", "binary"):
        return value.lower() == "true"
    try:
        return json.loads(value)
    except ValueError:
        pass
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return value


def _parse_block(block: str, tools: dict[str, dict]) -> list[dict] | None:
    """The calls in one `<seed:tool_call>` block, or None when it is not a valid call (then it is content)."""
    calls = []
    for closed, open_ in _FUNCTION.findall(block):
        text = closed or open_
        name, sep, body = text.partition(">")
        name = name.strip()
        if not sep or name not in tools:
            return None
        properties = (tools[name].get("parameters") or {}).get("properties") or {}
        arguments = {}
        for closed_p, open_p in _PARAMETER.findall(body):
            param, psep, value = (closed_p or open_p).partition(">")
            if not psep:
                return None
            value = value.removeprefix("\n")
            value = value.removesuffix("\n")
            arguments[param.strip()] = cast_value(value, properties.get(param.strip()))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}})
    return calls or None


class ToolCallStream:
    """Splits streamed answer text into (content delta, new calls)."""

    def __init__(self, tools: list[dict]):
        self.tools = {t["function"]["name"]: t["function"] for t in tools}
        self.calls: list[dict] = []  # every call emitted so far
        self._pending = ""
        self._in_call = False
        self._space = ""  # trailing whitespace of the content, sent once more content follows

    def _content(self, text: str) -> str:
        text = self._space + text
        body = text.rstrip()
        self._space = text[len(body):]
        return body

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict]]:
        """(content delta, calls completed by this delta); `final` closes an open block and flushes held text."""
        pending, content, calls = self._pending + delta, "", []
        while True:
            if not self._in_call:
                start = pending.find(CALL_START)
                if start == -1:
                    break
                content += self._content(pending[:start])
                self._space = ""  # whitespace right before a call is not content
                pending, self._in_call = pending[start + len(CALL_START):], True
            end = pending.find(CALL_END)
            if end == -1 and not final:
                break
            block, rest = (pending, "") if end == -1 else (pending[:end], pending[end + len(CALL_END):])
            parsed = _parse_block(block, self.tools)
            if parsed is None:  # not a call: its text is content
                content += self._content(CALL_START + block + ("" if end == -1 else CALL_END))
            else:
                calls += parsed
                self._space = ""
            pending, self._in_call = rest, False
        if not self._in_call:
            hold = 0 if final else partial_tag_suffix(pending, (CALL_START,))
            content += self._content(pending[:len(pending) - hold])
            pending = pending[len(pending) - hold:]
        if final:
            if not (self.calls or calls):
                content += self._space
            self._space = ""
        self._pending = pending
        self.calls += calls
        return content, calls


def parse(text: str, tools: list[dict]) -> tuple[str | None, list[dict]]:
    """(content, calls) of a whole answer."""
    content, calls = ToolCallStream(tools).feed(text, final=True)
    return content or None, calls


_MAX_BOUND = 4096  # string lengths the grammar counts exactly (a longer bound is left open: no huge automaton)


def _lark(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a Lark string literal (same escapes as JSON)


def _value_rule(spec: Any) -> str:
    """A parameter value in the call format: strings raw (no quotes; bounded by maxLength when given, never holding
    '<', which would start the closing tag), enums as their literal text, everything else as compact JSON for its
    schema (cast back by `cast_value`)."""
    spec = spec if isinstance(spec, dict) else {}
    if isinstance(spec.get("enum"), list) and spec["enum"]:
        return "(" + " | ".join(_lark(v if isinstance(v, str) else json.dumps(v)) for v in spec["enum"]) + ")"
    if _schema_type(spec) == "string":
        low, high = spec.get("minLength", 0), spec.get("maxLength")
        low = low if isinstance(low, int) and 0 <= low <= _MAX_BOUND else 0
        bounded = isinstance(high, int) and low <= high <= _MAX_BOUND
        return f"/[^<]{{{low},{high}}}/" if bounded else f"/[^<]{{{low},}}/" if low else "/[^<]*/"
    return "%json " + json.dumps({**spec, "x-guidance": {"whitespace_flexible": False}})


def _tag(tokenizer, text: str) -> str:
    """A tag as grammar: by token id (`<[7]>`) when it is one token. llguidance treats added tokens as special
    (matched by id, never by their text), so a text literal would not match the tag token the model writes."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return f"<[{ids[0]}]>" if len(ids) == 1 else _lark(text)


def call_grammar(tools: list[dict], name: str | None, tokenizer) -> str:
    """Lark grammar for exactly one call in the Seed-OSS format: to `name`, or (tool_choice "required") to any
    of `tools`. Required parameters come in schema order, then each optional one may follow."""
    start, end = _tag(tokenizer, CALL_START), _tag(tokenizer, CALL_END)
    rules, alternatives = [], []
    for i, tool in enumerate(t["function"] for t in tools):
        if name is not None and tool["name"] != name:
            continue
        parameters = tool.get("parameters") or {}
        properties = parameters.get("properties") or {}
        required = [p for p in properties if p in (parameters.get("required") or [])]
        optional = [p for p in properties if p not in required]
        parts = []
        for j, param in enumerate(required + optional):
            rules.append(f"p{i}_{j}: {_lark('<parameter=' + param + '>')} {_value_rule(properties[param])} "
                         f"{_lark('</parameter>' + chr(10))}")
            parts.append(f"p{i}_{j}" if param in required else f"p{i}_{j}?")
        opening = f'{start} {_lark(chr(10) + "<function=" + tool["name"] + ">" + chr(10))}'
        rules.append(f"call{i}: {opening} {' '.join(parts)} {_lark('</function>' + chr(10))} {end}")
        alternatives.append(f"call{i}")
    return "\n".join([f"start: {' | '.join(alternatives)}", *rules])
