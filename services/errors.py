"""One error hierarchy for every front end: each class knows its HTTP status, gRPC status code and OpenAI-style
error type, so the HTTP and gRPC layers translate errors without tables of their own.

`from_exception` turns whatever a request raised into a `ServiceError`: validation problems become
`InvalidRequest` naming the offending field, anything unexpected becomes `InternalError`, whose message carries
only an id (the details go to the log under that id, never to the client).

Client-visible messages never carry internal detail (actor ids, pids, node addresses, paths, exception reprs).
Every server-side error (5xx) has an `error_id`: the HTTP body carries it as ``error.id`` (and the ``X-Error-Id``
header), gRPC as the ``error-id`` trailing metadata, and the server log line with the full cause carries the same
id (`server_error` writes it).

Status choices that are not one-to-one:
- `PayloadTooLarge` (413) maps to gRPC ``INVALID_ARGUMENT``, not ``RESOURCE_EXHAUSTED``: resending the same request
  can never succeed, and clients and proxies treat ``RESOURCE_EXHAUSTED`` as retryable (it is also what HTTP 429
  maps to).
- `Unprocessable` (422: well-formed but unusable, e.g. text the model cannot take) is ``INVALID_ARGUMENT`` too.
- `Cancelled` uses 499, the de-facto "client closed request" status (nginx); gRPC has ``CANCELLED``.
- `code` is OpenAI's optional machine-readable code (a string such as ``"context_length_exceeded"``), None unless
  the raiser sets one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid

import pydantic

from seedoss.engine.errors import RequestError, StageUnavailable

log = logging.getLogger(__name__)


class ServiceError(Exception):
    http_status = 500
    grpc_code = "INTERNAL"
    error_type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        # server-side errors get an id the client can quote and the log line carries
        self.error_id = uuid.uuid4().hex[:16] if self.http_status >= 500 else None

    def to_openai_body(self) -> dict:
        body = {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}
        if self.error_id is not None:
            body["id"] = self.error_id
        return {"error": body}

    def http_headers(self) -> dict[str, str]:
        """Headers the HTTP response should carry (``X-Error-Id`` for server errors)."""
        return {} if self.error_id is None else {"X-Error-Id": self.error_id}

    def __reduce__(self):
        # Ray pickles errors between processes; the default (``cls(*args)``) would drop the keyword arguments.
        return _rebuild, (type(self), self.__dict__)


def _rebuild(cls: type[ServiceError], state: dict) -> ServiceError:
    error = cls.__new__(cls)
    Exception.__init__(error, state["message"])
    error.__dict__.update(state)
    return error


class _Retryable(ServiceError):
    def __init__(self, message: str, *, retry_after: float | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message, param=param, code=code)
        self.retry_after = retry_after  # seconds

    def http_headers(self) -> dict[str, str]:
        headers = super().http_headers()
        if self.retry_after is not None:
            headers["Retry-After"] = str(math.ceil(self.retry_after))
        return headers


class InvalidRequest(ServiceError):
    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    error_type = "invalid_request_error"


class Unauthenticated(ServiceError):
    http_status = 401
    grpc_code = "UNAUTHENTICATED"
    error_type = "authentication_error"


class NotFound(ServiceError):
    http_status = 404
    grpc_code = "NOT_FOUND"
    error_type = "not_found_error"


class PayloadTooLarge(ServiceError):
    http_status = 413
    grpc_code = "INVALID_ARGUMENT"
    error_type = "invalid_request_error"


class Unprocessable(ServiceError):
    http_status = 422
    grpc_code = "INVALID_ARGUMENT"
    error_type = "invalid_request_error"


class Overloaded(_Retryable):
    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"
    error_type = "overloaded_error"


class Cancelled(ServiceError):
    http_status = 499
    grpc_code = "CANCELLED"
    error_type = "cancelled_error"


class InternalError(ServiceError):
    """An unexpected failure. The message is generic plus `error_id`, which the log line of the cause carries."""

    def __init__(self, error_id: str | None = None):
        error_id = error_id or uuid.uuid4().hex[:16]
        super().__init__(f"internal error (id {error_id})")
        self.error_id = error_id


class Unavailable(_Retryable):
    http_status = 503
    grpc_code = "UNAVAILABLE"
    error_type = "service_unavailable_error"


def server_error(error: ServiceError, cause: BaseException) -> ServiceError:
    """`error` (a 5xx with a generic message) after logging its id with the full cause, which the client never
    sees."""
    log.error("error id %s: %s %r", error.error_id, error.error_type, error.message, exc_info=cause)
    return error


def from_exception(exc: BaseException) -> ServiceError:
    """The `ServiceError` to answer `exc` with (returned, not raised)."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, pydantic.ValidationError):
        first = exc.errors(include_url=False)[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        return InvalidRequest(f"{param}: {first['msg']}" if param else first["msg"], param=param)
    if isinstance(exc, RequestError):
        return InvalidRequest(str(exc), param=exc.field)
    if isinstance(exc, StageUnavailable):  # its text names actors and nodes
        return server_error(Unavailable("a pipeline stage is unavailable; retry shortly", retry_after=5), exc)
    if isinstance(exc, UnicodeDecodeError):
        return InvalidRequest(f"request is not valid UTF-8 (byte {exc.start})")
    if isinstance(exc, asyncio.CancelledError):
        return Cancelled("request cancelled")
    return server_error(InternalError(), exc)
