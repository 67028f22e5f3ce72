"""The gateway's transport-neutral core: what every front end (native HTTP, OpenAI HTTP, gRPC) does with a request,
so that each of them is a thin adapter from its wire format to these calls and back.

- **Admission**: API keys (`authenticate`), body/message size and JSON shape (`Limits`, `parse_json`).
- **Validation and tokenization**: a generation body is checked against the limits, validated as the native
  `GenerateRequest`, and its text tokenized *here and only here* (`generation_body`, `tokenized`), whichever front
  end it came through; the Generation deployment then receives ``prompt_token_ids`` and never tokenizes text.
  Tokenizing runs in a bounded thread pool (`AppConfig.tokenizer_threads`), never on the event loop: a 500,000-
  character prompt takes seconds to encode, and on the loop it would stall every stream this gateway relays.
- **Dispatch**: unary calls (`complete`, `task`) and generation streams (`open_streams`) through `Heads` (retries,
  timeouts, lane failover: deployments/routing.py), readiness (`head_status`, shared by concurrent probes), the
  engine's context length (`max_model_len`, asked once).

Errors are raised as `ServiceError`s (services/errors.py); each adapter maps them to its transport with
`seedoss.deployments.ingress.service_error`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from seedoss.tokenizer import SeedOssTokenizer
from seedoss.services.errors import InvalidRequest, Unauthenticated, from_exception
from seedoss.services.generation import SAMPLING_FIELDS, GenerateRequest
from seedoss.services.limits import Limits

from .ingress import lone_surrogate, service_error
from .routing import GenerationStream, Heads

PUBLIC_PATHS = frozenset({"/health", "/health/live", "/health/ready", "/seedoss.v1.SeedOss/Health"})  # probes
READY_TIMEOUT_S = 10
READY_CACHE_S = 1.0  # probes reuse a readiness answer this young instead of running a forward per head each
T = TypeVar("T")


class GatewayCore:
    def __init__(self, heads: Heads, tokenizer: SeedOssTokenizer, model_name: str, *, limits: Limits | None = None,
                 api_keys: list[str] | None = None, tokenizer_threads: int = 2):
        self.heads, self.tokenizer, self.model_name = heads, tokenizer, model_name
        self.limits = limits or Limits()
        self._api_keys = [k.encode() for k in api_keys or []]
        self._tokenizer_pool = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="gateway-tokenize")
        self._max_model_len: int | None = None
        self._head_status: asyncio.Future | None = None  # the latest readiness check (shared by concurrent probes)
        self._head_status_at = 0.0

    # ------------------------------------------------------------------------------------------- admission

    def authenticate(self, path: str, headers: Mapping[str, str]) -> None:
        """Raises `Unauthenticated` unless `path` is a probe or `headers` (HTTP headers or gRPC metadata, lowercase
        names) carry ``authorization: Bearer <key>`` with a configured key; no keys configured: everyone."""
        if not self._api_keys or path in PUBLIC_PATHS:
            return
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.encode(), k) for k in self._api_keys):
            raise Unauthenticated("missing or invalid API key: send 'Authorization: Bearer <key>'")

    def parse_json(self, raw: bytes) -> dict:
        """A JSON request body as a dict, within the body limits; anything else a 4xx naming the problem."""
        limits = self.limits
        limits.check_body_size(len(raw))  # bodies sent without Content-Length are only measurable here
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InvalidRequest(f"request body is not valid UTF-8 (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"request body is not valid JSON: {e}") from None
        except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
            raise InvalidRequest("request body has an integer too large to read", param="body") from None
        except RecursionError:  # nesting deeper than the parser's stack
            raise InvalidRequest(f"request body nests deeper than {limits.max_json_depth} levels",
                                 param="body") from None
        if not isinstance(body, dict):
            raise InvalidRequest("request body must be a JSON object")
        limits.check_json_depth(body)
        if (field := lone_surrogate(body)) is not None:
            raise InvalidRequest(f"{field}: contains a lone UTF-16 surrogate escape (not text)", param=field)
        return body

    # ------------------------------------------------------------------------------------------ tokenizing

    async def tokenized(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` — anything that tokenizes or renders a chat template — in the gateway's bounded tokenizer
        pool, off the event loop. Every front end's text reaches the tokenizer through here."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, fn, *args)

    async def generation_body(self, body: dict[str, Any]) -> tuple[GenerateRequest, dict[str, Any]]:
        """A native `/v1/generate` body (also what gRPC's GenerateRequest maps to) checked against the limits,
        validated, and tokenized: the request and the body for the Generation deployment (its sampling fields as
        sent, the prompt as ``prompt_token_ids``)."""
        self.limits.check_generation(body)
        try:
            request = GenerateRequest.model_validate(body)
        except Exception as e:
            raise from_exception(e) from None
        ids = await self.tokenized(request.prompt_ids, self.tokenizer)
        sampling = {k: v for k, v in body.items() if k in SAMPLING_FIELDS}
        return request, {**sampling, "prompt_token_ids": ids}

    async def prompt_ids(self, body: dict[str, Any]) -> list[int]:
        """The token ids of a native body's prompt (`prompt`, `messages` or `prompt_token_ids`): tokenize routes."""
        self.limits.check_generation(body)
        try:
            request = GenerateRequest.model_validate(body)
        except Exception as e:
            raise from_exception(e) from None
        return await self.tokenized(request.prompt_ids, self.tokenizer)

    # ------------------------------------------------------------------------------------------- dispatch

    async def complete(self, native_body: dict[str, Any]) -> dict:
        """A whole generation (retried while nothing was sent and its replica was lost)."""
        return await self.heads.call("generate", native_body, "complete")

    async def open_streams(self, native_bodies: list[dict[str, Any]]) -> tuple[list[GenerationStream], list[dict]]:
        """One generation stream per body, each with its first chunk fetched: request errors surface here, before
        any byte is sent; on one the streams already opened are cancelled."""
        streams = [self.heads.stream(b) for b in native_bodies]
        try:
            firsts = [await s.__anext__() for s in streams]
        except BaseException:
            for s in streams:
                s.cancel()
            raise
        return streams, firsts

    async def task(self, task: str, body: dict[str, Any]) -> dict:
        """A head task (classify, tag, qa, embed): the head validates, tokenizes (its own windows and offsets)
        and bounds it (`Limits`, handed to the heads)."""
        return await self.heads.call(task, body)

    def check_model(self, requested: str | None) -> None:
        from seedoss.services.openai import check_model

        check_model(requested, self.model_name)

    async def max_model_len(self) -> int | None:
        """The engine's context length (prompt + output), asked of the Generation deployment once; the tokenizer's
        `model_max_length` if that deployment cannot say."""
        if self._max_model_len is None:
            try:
                self._max_model_len = int(await self.heads.get("generate").max_model_len.remote())
            except Exception as e:
                if "does not exist" not in str(e):  # Serve's answer for a missing method: remember the fallback
                    return self.tokenizer.model_max_length
                self._max_model_len = self.tokenizer.model_max_length
        return self._max_model_len

    async def head_status(self) -> dict[str, str]:
        """Each deployed head's readiness ("ready" or "unavailable: <reason>"), checked at most every
        READY_CACHE_S: concurrent and repeated probes share one check."""
        now = time.monotonic()
        if self._head_status is None or (self._head_status.done() and now - self._head_status_at > READY_CACHE_S):
            self._head_status_at = now
            self._head_status = asyncio.ensure_future(self._check_heads())
        return dict(await asyncio.shield(self._head_status))

    async def _check_heads(self) -> dict[str, str]:
        status = {}
        for task in self.heads.deployed():
            try:
                await asyncio.wait_for(self.heads.ready(task), READY_TIMEOUT_S)
                status[task] = "ready"
            except Exception as e:
                status[task] = f"unavailable: {service_error(e).message}"
        return status

