"""The native HTTP routes (README "HTTP API"): an adapter from JSON bodies and SSE to the gateway core's calls.

`router(core)` returns the routes bound to one `GatewayCore`; the Gateway includes them into the FastAPI app it
builds per replica (deployments/gateway.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from seedoss.services.classification import ClassificationRequest
from seedoss.services.errors import Unavailable
from seedoss.services.generation import GenerateRequest
from seedoss.services.qa import QARequest
from seedoss.services.tagging import TaggingRequest

from .gateway_core import GatewayCore
from .ingress import body_schema, error_response, json_body, service_error, sse_response


def router(core: GatewayCore) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/generate", openapi_extra=body_schema(GenerateRequest))
    async def generate(request: Request):
        try:
            generate_request, native = await core.generation_body(await json_body(request, core))
            if not generate_request.stream:  # nothing is sent before the answer: retried if the replica dies
                return await core.complete(native)
            streams, firsts = await core.open_streams([native])
        except Exception as e:
            return error_response(service_error(e))

        async def relayed():
            yield firsts[0]
            async for chunk in streams[0]:
                yield chunk

        return sse_response(relayed(), streams)

    def task_route(path: str, task: str, model):
        @api.post(path, openapi_extra=body_schema(model), name=task)
        async def run_task(request: Request):
            try:  # the head's answer is JSON-ready already: a JSONResponse skips FastAPI's jsonable_encoder walk
                return JSONResponse(await core.task(task, await json_body(request, core)))
            except Exception as e:
                return error_response(service_error(e))

    task_route("/v1/classify", "classify", ClassificationRequest)
    task_route("/v1/tag", "tag", TaggingRequest)
    task_route("/v1/answer", "qa", QARequest)

    @api.get("/health/live")
    async def live():
        """The gateway process answers (liveness: restart me if not)."""
        return {"status": "alive"}

    @api.get("/health/ready")
    @api.get("/health")
    async def ready():
        """Ready only when every head, and through them every stage, answers; per-head status in the body."""
        status = await core.head_status()
        if any(v != "ready" for v in status.values()):
            error = Unavailable(f"not ready: {status}", retry_after=5)
            return JSONResponse({**error.to_openai_body(), "status": "not_ready", "heads": status},
                                status_code=error.http_status, headers=error.http_headers())
        return {"status": "ready", "heads": status}

    return api
