"""Per-request limits: every request's work is bounded before it costs anything (one pydantic model, no Ray).

`Limits` is embedded in the app config (``limits:`` in `deployments/config.py:AppConfig`) and handed to the gateway
(body size, gRPC message size, JSON shape, generation fields) and to the task heads (inputs per request, characters
before tokenizing, backbone tokens before any forward). Each check raises a `ServiceError` naming the field:
413 `PayloadTooLarge` for sizes (body, message), 400 `InvalidRequest` for everything else; over gRPC both are
``INVALID_ARGUMENT`` (resending the same request can never succeed; see services/errors.py).

Defaults, and why (each is a knob in `AppConfig.limits`):
- ``max_body_bytes`` 4 MiB: TEI's ``--payload-limit`` default is 2 MB, gRPC's default receive limit 4 MiB; a 4 MiB
  body holds about a million tokens of text, far more than any context we serve. gRPC messages get the same limit.
- ``max_json_depth`` 32: our request bodies nest at most 5 deep (chat content parts, template kwargs); the limit
  only stops parser-recursion bombs.
- ``max_n`` 16: OpenAI caps ``n`` at 128 on its own hardware; every fork recomputes the prompt and holds a scheduler
  slot (the engine runs 64 sequences at once by default), so one request may take a quarter of them, not all.
- ``max_stop_strings`` 16, ``max_stop_string_chars`` 256: OpenAI allows 4 stop sequences; vLLM has no limit, and
  every string is matched against the tail of every generated token on the engine loop, so cost is count × length.
- ``max_prompt_chars`` 500,000: checked before tokenizing (tokenizing 1 MB of text took 2.8 s here). At ~4
  characters a token that is ~125k tokens, beyond the engine's context by default, so a prompt rejected by it
  would have been rejected for its tokens anyway. For chat, the total of every message's text counts.
- ``max_client_batch_size`` 32: TEI's default for inputs per classify/embed request; also the number of prompts
  of one OpenAI completions request (each becomes a generation of its own).
- ``max_task_tokens`` 32,768 backbone tokens per classify/tag/QA request, windows × their length: twice TEI's
  ``max_batch_tokens`` default (16,384); with the QA defaults (384-token windows, stride 128) that covers ~21k
  context tokens (~80 KB of text). Checked after tokenizing and before any forward runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .errors import InvalidRequest, PayloadTooLarge


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(4 << 20, ge=1024, description="HTTP body and gRPC message bytes (413)")
    max_json_depth: int = Field(32, ge=4, description="nesting of a JSON body's arrays and objects")
    max_n: int = Field(16, ge=1, description="choices per generation request (`n`)")
    max_stop_strings: int = Field(16, ge=0, description="`stop` strings per request")
    max_stop_string_chars: int = Field(256, ge=1, description="characters per `stop` string")
    max_prompt_chars: int = Field(500_000, ge=1, description="characters of text per request, before tokenizing")
    max_client_batch_size: int = Field(32, ge=1, description="classify/tag `inputs`, completions prompts per request")
    max_task_tokens: int = Field(32_768, ge=1, description="backbone tokens per classify/tag/QA request (all windows)")

    # ------------------------------------------------------------------------------------------- sizes

    def check_body_size(self, size: int, what: str = "request body") -> None:
        if size > self.max_body_bytes:
            raise PayloadTooLarge(f"{what} of {size} bytes exceeds the limit of {self.max_body_bytes}", param="body")

    def check_json_depth(self, value: Any) -> None:
        """Nesting of a parsed JSON value (iterative: a deep value must not exhaust our own stack either)."""
        stack = [(value, 1)]
        while stack:
            item, depth = stack.pop()
            children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
            for child in children:
                if isinstance(child, (dict, list)):
                    if depth + 1 > self.max_json_depth:
                        raise InvalidRequest(f"request body nests deeper than {self.max_json_depth} levels",
                                             param="body")
                    stack.append((child, depth + 1))

    # ---------------------------------------------------------------------------------- generation

    def check_generation(self, body: dict[str, Any]) -> None:
        """`n`, `stop` and prompt text of a generation body (native `/v1/generate`, OpenAI completions or chat);
        fields of the wrong type are left to the request schema."""
        n = body.get("n")
        # a float counts too: the schema's lax mode turns 616941447.0 into an int after this check
        if isinstance(n, (int, float)) and not isinstance(n, bool) and n > self.max_n:
            raise InvalidRequest(f"n: {n} is more than the limit of {self.max_n}", param="n")
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
        if len(stops) > self.max_stop_strings:
            raise InvalidRequest(f"stop: {len(stops)} strings, more than the limit of {self.max_stop_strings}",
                                 param="stop")
        for i, s in enumerate(stops):
            if isinstance(s, str) and len(s) > self.max_stop_string_chars:
                raise InvalidRequest(f"stop.{i}: {len(s)} characters, more than the limit of "
                                     f"{self.max_stop_string_chars}", param="stop")
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            self.check_chars("prompt", len(prompt))
        elif isinstance(prompt, list):
            # OpenAI completions: a list of texts or of token-id lists is one request per prompt (a flat list of
            # ints is a single prompt); each is a generation of its own, so their number is bounded like inputs
            prompts = sum(isinstance(p, (str, list)) for p in prompt)
            if prompts > self.max_client_batch_size:
                raise InvalidRequest(f"prompt: {prompts} prompts, more than the limit of {self.max_client_batch_size} "
                                     "per request", param="prompt")
            self.check_chars("prompt", sum(len(p) for p in prompt if isinstance(p, str)))
        messages = body.get("messages")
        if isinstance(messages, list):
            self.check_chars("messages", sum(_text_chars(m.get("content")) for m in messages if isinstance(m, dict)))

    # ----------------------------------------------------------------------------------------- tasks

    def check_chars(self, field: str, chars: int) -> None:
        if chars > self.max_prompt_chars:
            raise InvalidRequest(f"{field}: {chars} characters, more than the limit of {self.max_prompt_chars}",
                                 param=field)

    def check_texts(self, field: str, texts: Iterable[str]) -> None:
        """Inputs per request and their characters, before tokenizing (classify, tag)."""
        texts = list(texts)
        if len(texts) > self.max_client_batch_size:
            raise InvalidRequest(f"{field}: {len(texts)} inputs, more than the limit of {self.max_client_batch_size} "
                                 "per request", param=field)
        self.check_chars(field, sum(map(len, texts)))

    def check_task_tokens(self, field: str, total: int) -> None:
        """Backbone tokens of a task request (every window), before any forward runs (and before the windows are
        built: a request over the limit may describe millions of tokens)."""
        if total > self.max_task_tokens:
            raise InvalidRequest(
                f"{field}: this request runs {total} tokens through the model (all windows), more than the limit of "
                f"{self.max_task_tokens}; send less text, or fewer, larger windows", param=field,
                code="request_too_large")


def _text_chars(value: Any) -> int:
    """Characters of every string in a message's content (a string, or content parts)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_chars(v) for v in value.values())
    if isinstance(value, list):
        return sum(_text_chars(v) for v in value)
    return 0
