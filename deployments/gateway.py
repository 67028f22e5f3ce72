"""HTTP ingress: native JSON routes to the head services, SSE streaming for generation, errors as JSON 4xx."""

import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayTaskError

from services.errors import InvalidRequest, NotFound, ServiceError, Unavailable, from_exception
from services.generation import sse

log = logging.getLogger(__name__)
api = FastAPI(title="SeedOss Serve", docs_url="/docs")


def service_error(exc: BaseException) -> ServiceError:
    """The client-facing error for anything a route (or a replica behind it) raised."""
    while isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
        exc = exc.cause
    return from_exception(exc)


def error_response(error: ServiceError) -> JSONResponse:
    return JSONResponse(error.to_openai_body(), status_code=error.http_status, headers=error.http_headers())


async def json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"request body is not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


@serve.deployment(name="Gateway")
@serve.ingress(api)
class Gateway:
    def __init__(self, generation, classify=None, tag=None, qa=None):
        self.heads = {"generate": generation, "classify": classify, "tag": tag, "qa": qa}

    def _head(self, task: str):
        handle = self.heads.get(task)
        if handle is None:
            raise NotFound(f"no {task} head is deployed in this application", param="task")
        return handle

    @api.post("/v1/generate")
    async def generate(self, request: Request):
        try:
            body = await json_body(request)
            handle = self._head("generate")
            if not body.get("stream"):
                return await handle.complete.remote(body)
            chunks = handle.options(stream=True).stream.remote(body)
            first = await chunks.__anext__()  # validation errors surface here, before any byte is sent
        except Exception as e:
            return error_response(service_error(e))

        async def events():
            yield sse(first)
            try:
                async for chunk in chunks:
                    yield sse(chunk)
            except Exception as e:  # mid-stream failure: report it in-band, then end the stream
                yield sse(service_error(e).to_openai_body())
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _task(self, task: str, request: Request):
        try:
            return await self._head(task).remote(await json_body(request))
        except Exception as e:
            return error_response(service_error(e))

    @api.post("/v1/classify")
    async def classify(self, request: Request):
        return await self._task("classify", request)

    @api.post("/v1/tag")
    async def tag(self, request: Request):
        return await self._task("tag", request)

    @api.post("/v1/answer")
    async def answer(self, request: Request):
        return await self._task("qa", request)

    @api.get("/health")
    async def health(self):
        status = {}
        for task, handle in self.heads.items():
            if handle is None:
                continue
            try:
                await handle.ready.remote()
                status[task] = "ready"
            except Exception as e:
                status[task] = f"unavailable: {service_error(e).message}"
        ok = all(v == "ready" for v in status.values())
        if not ok:
            return error_response(Unavailable(f"not ready: {status}", retry_after=5))
        return {"status": "ok", "heads": status}
