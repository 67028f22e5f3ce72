"""HTTP ingress: native JSON routes to the head services, SSE streaming for generation, errors as JSON 4xx,
bearer-token auth, a request body limit, per-route metrics, liveness and readiness."""

import hmac
import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from seedoss.tokenizer import SeedOssTokenizer
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.errors import InvalidRequest, NotFound, PayloadTooLarge, ServiceError, Unauthenticated, Unavailable
from services.classification import ClassificationRequest
from services.generation import GenerateRequest
from services.limits import Limits
from services.qa import QARequest
from services.tagging import TaggingRequest

from .config import resolve_api_keys
from .faults import RetryPolicy, Timeouts
from .grpc_api import GrpcMethods
from .ingress import body_schema, error_response, json_body, service_error, sse_response
from .metrics import LATENCY, REQUESTS
from .openai_api import router as openai_router
from .routing import Heads

api = FastAPI(title="SeedOss Serve", docs_url="/docs")
api.include_router(openai_router)
PUBLIC_PATHS = {"/health", "/health/live", "/health/ready"}  # probes carry no credentials


@api.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException):
    """Unknown routes and wrong methods answer in the same JSON error shape as everything else."""
    if exc.status_code == 404:
        return error_response(NotFound(f"no route {request.method} {request.url.path}", param="path"))
    error = InvalidRequest(str(exc.detail))
    error.http_status = exc.status_code
    return error_response(error)


@api.middleware("http")
async def guard(request: Request, call_next):
    """Auth and body limit before any route runs; request count and latency after."""
    start = time.monotonic()
    gateway = getattr(request.app.state, "gateway", None)
    error = gateway.check_request(request.url.path, request.headers) if gateway else None
    response = error_response(error) if error else await call_next(request)
    route = getattr(request.scope.get("route"), "path", "unmatched")  # the route template: bounded label values
    REQUESTS.inc(tags={"route": route, "status": str(response.status_code)})
    LATENCY.observe(time.monotonic() - start, tags={"route": route})
    return response


@serve.deployment(name="Gateway")
@serve.ingress(api)
class Gateway(GrpcMethods):
    def __init__(self, checkpoint: str, model_name: str, generation, classify=None, tag=None, qa=None, embed=None, *,
                 api_keys: list[str] | None = None, limits: Limits | None = None, require_api_keys: bool = False,
                 retry: dict | None = None, timeouts: dict | None = None):
        self.heads = Heads({"generate": generation, "classify": classify, "tag": tag, "qa": qa, "embed": embed},
                           RetryPolicy.model_validate(retry or {}), Timeouts.model_validate(timeouts or {}))
        self.tokenizer = SeedOssTokenizer.from_pretrained(checkpoint)
        self.model_name = model_name
        keys = resolve_api_keys(api_keys, os.environ.get("SEEDOSS_API_KEYS", ""), require_api_keys)
        self.api_keys = [k.encode() for k in keys]
        self.limits = limits or Limits()
        api.state.gateway = self  # for the middleware and routes defined outside this class (OpenAI API)

    def check_request(self, path: str, headers) -> ServiceError | None:
        """The error to answer with before routing (missing/bad credentials, oversized body), or None."""
        if self.api_keys and path not in PUBLIC_PATHS:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.encode(), k) for k in self.api_keys):
                return Unauthenticated("missing or invalid API key: send 'Authorization: Bearer <key>'")
        length = headers.get("content-length")
        if length and length.isdigit():
            try:
                self.limits.check_body_size(int(length) if len(length) < 19 else 1 << 63)  # int() of 5000 digits raises
            except PayloadTooLarge as e:
                return e
        return None

    @api.post("/v1/generate", openapi_extra=body_schema(GenerateRequest))
    async def generate(self, request: Request):
        try:
            body = await json_body(request)
            self.limits.check_generation(body)
            if not body.get("stream"):  # nothing is sent before the answer: retried if the replica dies
                return await self.heads.call("generate", body, "complete")
            chunks = self.heads.stream(body)
            first = await chunks.__anext__()  # validation errors surface here, before any byte is sent
        except Exception as e:
            return error_response(service_error(e))

        async def relayed():
            yield first
            async for chunk in chunks:
                yield chunk

        return sse_response(relayed(), [chunks])

    async def _task(self, task: str, request: Request):
        try:
            return await self.heads.call(task, await json_body(request))
        except Exception as e:
            return error_response(service_error(e))

    @api.post("/v1/classify", openapi_extra=body_schema(ClassificationRequest))
    async def classify(self, request: Request):
        return await self._task("classify", request)

    @api.post("/v1/tag", openapi_extra=body_schema(TaggingRequest))
    async def tag(self, request: Request):
        return await self._task("tag", request)

    @api.post("/v1/answer", openapi_extra=body_schema(QARequest))
    async def answer(self, request: Request):
        return await self._task("qa", request)

    @api.get("/health/live")
    async def live(self):
        """The gateway process answers (liveness: restart me if not)."""
        return {"status": "alive"}

    @api.get("/health/ready")
    @api.get("/health")
    async def ready(self):
        """Ready only when every head, and through them every stage, answers; per-head status in the body."""
        status = await self.head_status()
        if any(v != "ready" for v in status.values()):
            error = Unavailable(f"not ready: {status}", retry_after=5)
            return JSONResponse({**error.to_openai_body(), "status": "not_ready", "heads": status},
                                status_code=error.http_status, headers=error.http_headers())
        return {"status": "ready", "heads": status}
