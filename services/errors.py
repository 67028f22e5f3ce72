"""One error hierarchy for every front end: each class knows its HTTP status, gRPC status code and OpenAI-style
error type, so the HTTP and gRPC layers translate errors without tables of their own.

`from_exception` turns whatever a request raised into a `ServiceError`: validation problems become
`InvalidRequest` naming the offending field, anything unexpected becomes `InternalError`, whose message carries
only an id (the details go to the log under that id, never to the client).

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
import sys
import uuid

import pydantic

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

    def to_openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def http_headers(self) -> dict[str, str]:
        """Headers the HTTP response should carry (``Retry-After`` for the retryable errors)."""
        return {}

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
        return {} if self.retry_after is None else {"Retry-After": str(math.ceil(self.retry_after))}


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
        self.error_id = error_id or uuid.uuid4().hex[:16]
        super().__init__(f"internal error (id {self.error_id})")


class Unavailable(_Retryable):
    http_status = 503
    grpc_code = "UNAVAILABLE"
    error_type = "service_unavailable_error"


def from_exception(exc: BaseException) -> ServiceError:
    """The `ServiceError` to answer `exc` with (returned, not raised)."""
    # Not imported: the engine pulls in torch, and a process that never loaded it cannot have raised its errors.
    engine = sys.modules.get("seedoss.engine.engine")
    executor = sys.modules.get("seedoss.engine.executor")
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, pydantic.ValidationError):
        first = exc.errors(include_url=False)[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        return InvalidRequest(f"{param}: {first['msg']}" if param else first["msg"], param=param)
    if engine is not None and isinstance(exc, engine.RequestError):
        return InvalidRequest(str(exc), param=exc.field)
    if executor is not None and isinstance(exc, executor.StageUnavailable):
        return Unavailable(f"a pipeline stage is unavailable ({exc}); retry shortly", retry_after=5)
    if isinstance(exc, UnicodeDecodeError):
        return InvalidRequest(f"request is not valid UTF-8 (byte {exc.start})")
    if isinstance(exc, asyncio.CancelledError):
        return Cancelled("request cancelled")
    error = InternalError()
    log.error("internal error %s", error.error_id, exc_info=exc)
    return error
