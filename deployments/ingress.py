"""What the gateway's HTTP routes (native, OpenAI) and gRPC methods share: errors from replicas to clients and
JSON bodies."""

import json

from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray.exceptions import RayTaskError
from ray.serve.exceptions import RequestCancelledError

from services.errors import (
    Cancelled, InvalidRequest, Overloaded, PayloadTooLarge, ServiceError, Unavailable, from_exception,
)
from services.generation import sse

from .faults import CallTimeout, PoisonRequest, backpressure, replica_lost


def service_error(exc: BaseException) -> ServiceError:
    """The client-facing error for anything a route (or a replica behind it) raised."""
    while isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
        exc = exc.cause
    if isinstance(exc, PoisonRequest):  # not "unavailable": retrying would crash another replica
        return from_exception(exc)
    if backpressure(exc):  # a deployment's max_queued_requests is reached
        return Overloaded("the server is at capacity; retry shortly", retry_after=1)
    if replica_lost(exc):
        return Unavailable("a service replica is unavailable; retry shortly", retry_after=5)
    if isinstance(exc, CallTimeout):  # a hung replica: the call was cancelled
        return Unavailable("the service did not answer in time; retry shortly", retry_after=5)
    if isinstance(exc, RequestCancelledError):
        return Cancelled("request cancelled")
    return from_exception(exc)


def error_response(error: ServiceError) -> JSONResponse:
    return JSONResponse(error.to_openai_body(), status_code=error.http_status, headers=error.http_headers())


async def json_body(request: Request) -> dict:
    raw = await request.body()
    limit = request.app.state.gateway.max_body_bytes
    if len(raw) > limit:  # bodies sent without Content-Length are only measurable here
        raise PayloadTooLarge(f"request body of {len(raw)} bytes exceeds the limit of {limit}")
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"request body is not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


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
