"""What the gateway's HTTP adapters (native, OpenAI) and gRPC methods share: errors from replicas to clients, JSON
bodies, the OpenAPI body schemas and SSE responses."""

import re
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from ray.exceptions import RayTaskError
from ray.serve.exceptions import RequestCancelledError

from seedoss.services.errors import (
    Cancelled,
    Overloaded,
    ServiceError,
    Unavailable,
    from_exception,
    server_error,
)
from seedoss.services.generation import sse

from .faults import CallTimeout, PoisonRequest, backpressure, replica_lost


def service_error(exc: BaseException) -> ServiceError:
    """The client-facing error for anything a route (or a replica behind it) raised."""
    while isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
        exc = exc.cause
    if isinstance(exc, PoisonRequest):  # not "unavailable": retrying would crash another replica
        return from_exception(exc)
    if backpressure(exc):  # a deployment's max_queued_requests is reached
        return Overloaded("the server is at capacity; retry shortly", retry_after=1)
    if replica_lost(exc):  # Ray's text names actors, pids and nodes: the log gets it under the error id
        return server_error(Unavailable("a service replica is unavailable; retry shortly", retry_after=5), exc)
    if isinstance(exc, CallTimeout):  # a hung replica: the call was cancelled
        return server_error(Unavailable("the service did not answer in time; retry shortly", retry_after=5), exc)
    if isinstance(exc, RequestCancelledError):
        return Cancelled("request cancelled")
    return from_exception(exc)


def error_response(error: ServiceError) -> JSONResponse:
    return JSONResponse(error.to_openai_body(), status_code=error.http_status, headers=error.http_headers())


async def json_body(request: Request, core) -> dict:
    """The request's JSON body, parsed and checked by the gateway core (`GatewayCore.parse_json`)."""
    return core.parse_json(await request.body())


_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(value) -> str | None:
    """The path of the first string in `value` holding an unpaired surrogate (JSON's ``"\\ud800"`` decodes to one;
    it cannot be encoded as UTF-8, so the tokenizer and every response would fail on it), or None."""
    stack = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                return path or "body"
        elif isinstance(item, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in item.items())
            stack.extend(("body", k) for k in item if not k.isascii())  # keys too, reported as the body
        elif isinstance(item, list):
            stack.extend((f"{path}.{i}" if path else str(i), v) for i, v in enumerate(item))
    return None


def body_schema(model: type[BaseModel]) -> dict:
    """`openapi_extra` declaring a route's JSON body as `model` (routes read the raw body themselves, to answer bad
    JSON with our own errors, so FastAPI cannot infer it): the OpenAPI document then describes every request, for
    clients and for schema-driven fuzzing (bench/fuzz.py). The schema is inlined: `$defs` references resolved."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            here = {k: inline(v) for k, v in node.items() if k != "$ref"}
            return {**inline(defs[node["$ref"].rsplit("/", 1)[-1]]), **here} if "$ref" in node else here
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


def sse_response(chunks: AsyncIterator[dict], streams: list,
                 client_error: Callable[[ServiceError], ServiceError] = lambda e: e) -> StreamingResponse:
    """Server-sent events of `chunks`, ending with `data: [DONE]`; a failure mid-stream is sent in-band. When the
    client goes away first, Serve cancels this generator: then the generation `streams` are cancelled too, so the
    engine aborts the request and frees its KV cache (Serve itself only cancels calls not yet sent to a replica)."""
    async def events():
        finished = False
        try:
            try:
                async for chunk in chunks:
                    yield sse(chunk)
            except Exception as e:
                yield sse(client_error(service_error(e)).to_openai_body())
            yield sse("[DONE]")
            finished = True
        finally:
            if not finished:
                for stream in streams:
                    stream.cancel()

    return StreamingResponse(events(), media_type="text/event-stream")
