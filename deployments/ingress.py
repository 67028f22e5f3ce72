"""What the gateway's HTTP routes (native, OpenAI) and gRPC methods share: errors from replicas to clients,
JSON bodies, and access to the head handles of the running Gateway."""

import json

from fastapi import Request
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

from services.errors import (
    Cancelled, InvalidRequest, NotFound, Overloaded, PayloadTooLarge, ServiceError, Unavailable, from_exception,
)


def service_error(exc: BaseException) -> ServiceError:
    """The client-facing error for anything a route (or a replica behind it) raised."""
    while isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
        exc = exc.cause
    if isinstance(exc, BackPressureError):  # a deployment's max_queued_requests is reached
        return Overloaded("the server is at capacity; retry shortly", retry_after=1)
    if isinstance(exc, (DeploymentUnavailableError, RayActorError)):
        return Unavailable(f"a service replica is unavailable ({type(exc).__name__}); retry shortly", retry_after=5)
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


class Heads:
    """Deployment handles of the head services, by task ("generate", "classify", "tag", "qa")."""

    def __init__(self, generation, classify=None, tag=None, qa=None):
        self.handles = {"generate": generation, "classify": classify, "tag": tag, "qa": qa}

    def get(self, task: str):
        handle = self.handles.get(task)
        if handle is None:
            raise NotFound(f"no {task} head is deployed in this application", param="task")
        return handle

    def deployed(self) -> dict:
        return {task: h for task, h in self.handles.items() if h is not None}
