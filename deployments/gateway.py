"""The Gateway deployment: one `GatewayCore` (deployments/gateway_core.py: auth, limits, validation, tokenization,
dispatch) behind three thin adapters — the native HTTP routes (deployments/native_api.py), the OpenAI-compatible
routes (deployments/openai_api.py) and the gRPC methods (deployments/grpc_api.py).

The FastAPI app is built per replica, from that replica's core, when Serve initialises it (`serve.ingress()` without
an app calls `__serve_build_asgi_app__` after the constructor), the way Ray Serve LLM builds its ingress per class:
no module-global app, no `app.state` back-pointer, every route a closure over the core it serves.

Adding an HTTP route: write it inside the `router(core)` of the adapter it belongs to (or a new module with its own
`router(core) -> APIRouter`, included in `http_app` below), reading its body with
``await json_body(request, core)`` (size, JSON, depth, surrogates checked), tokenizing only through
``await core.tokenized(fn, *args)`` / ``core.generation_body(body)``, dispatching through ``core.complete``,
``core.open_streams`` or ``core.task``, and answering errors with ``error_response(service_error(e))``. Declare
its body with ``openapi_extra=body_schema(Model)`` so the OpenAPI document (and the fuzzer) knows it. Auth, the
Content-Length check and per-route metrics come from `http_app`'s middleware.
"""

from __future__ import annotations

import os
import time

import ray
from fastapi import FastAPI, Request
from ray import serve
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from seedoss.tokenizer import SeedOssTokenizer
from seedoss.services.errors import InvalidRequest, NotFound, ServiceError
from seedoss.services.limits import Limits

from . import native_api, openai_api
from .config import resolve_api_keys
from .faults import RetryPolicy, Timeouts
from .gateway_core import GatewayCore
from .heads import TaskHead
from .grpc_api import GrpcMethods
from .ingress import error_response
from .metrics import LATENCY, REQUESTS
from .routing import Heads
from .stream_channel import StreamReceiver


def http_app(core: GatewayCore) -> FastAPI:
    """The HTTP front end of `core`: native and OpenAI routes, errors in one JSON shape, auth and the body limit
    before any route runs, request count and latency per route."""
    app = FastAPI(title="SeedOss Serve", docs_url="/docs")
    app.include_router(native_api.router(core))
    app.include_router(openai_api.router(core))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        """Unknown routes and wrong methods answer in the same JSON error shape as everything else."""
        if exc.status_code == 404:
            return error_response(NotFound(f"no route {request.method} {request.url.path}", param="path"))
        error = InvalidRequest(str(exc.detail))
        error.http_status = exc.status_code
        return error_response(error)

    app.add_middleware(Guard, core=core)
    return app


class Guard:
    """Auth and the Content-Length check before any route runs; the request count and the time to response headers
    per route. Plain ASGI: Starlette's `@app.middleware("http")` runs every request through a task group and a
    re-streamed response, a large share of the gateway's CPU per small request."""

    def __init__(self, app: ASGIApp, core: GatewayCore):
        self.app, self.core = app, core

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()

        async def measured(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", "unmatched")  # the route template: bounded labels
                REQUESTS.inc(tags={"route": route, "status": str(message["status"])})
                LATENCY.observe(time.monotonic() - start, tags={"route": route})
            await send(message)

        try:
            headers = Headers(scope=scope)
            self.core.authenticate(scope["path"], headers)
            length = headers.get("content-length")
            if length and length.isdigit():  # int() of 5000 digits raises: such a length is simply too large
                self.core.limits.check_body_size(int(length) if len(length) < 19 else 1 << 63)
        except ServiceError as e:
            return await error_response(e)(scope, receive, measured)
        await self.app(scope, receive, measured)


@serve.deployment(name="Gateway")
@serve.ingress()
class Gateway(GrpcMethods):
    def __init__(self, checkpoint: str, model_name: str, generation, classify=None, tag=None, qa=None, embed=None, *,
                 local_heads: dict[str, tuple] | None = None, api_keys: list[str] | None = None,
                 limits: Limits | None = None, require_api_keys: bool = False, retry: dict | None = None,
                 timeouts: dict | None = None, tokenizer_threads: int = 2, stage_transport: str = "direct",
                 stream_transport: str = "direct"):
        """`classify` ... `embed`: handles of head deployments; `local_heads`: `TaskHead` arguments by task, for
        heads that run in this replica instead (`AppConfig.head_placement`)."""
        local = {task: TaskHead(task, *args, limits=limits, stage_transport=stage_transport)
                 for task, args in (local_heads or {}).items()}
        receiver = StreamReceiver(ray.util.get_node_ip_address()) if stream_transport == "direct" else None
        heads = Heads({"generate": generation, "classify": classify, "tag": tag, "qa": qa, "embed": embed},
                      RetryPolicy.model_validate(retry or {}), Timeouts.model_validate(timeouts or {}), local=local,
                      receiver=receiver)
        keys = resolve_api_keys(api_keys, os.environ.get("SEEDOSS_API_KEYS", ""), require_api_keys)
        self.core = GatewayCore(heads, SeedOssTokenizer.from_pretrained(checkpoint), model_name, limits=limits,
                                api_keys=keys, tokenizer_threads=tokenizer_threads)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return http_app(self.core)
