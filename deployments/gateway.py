"""HTTP ingress: native JSON routes to the head services, SSE streaming for generation, errors as JSON 4xx."""

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve

from seedoss.tokenizer import SeedOssTokenizer
from services.errors import Unavailable
from services.generation import sse

from .ingress import Heads, error_response, json_body, service_error

api = FastAPI(title="SeedOss Serve", docs_url="/docs")


@serve.deployment(name="Gateway")
@serve.ingress(api)
class Gateway:
    def __init__(self, checkpoint: str, model_name: str, generation, classify=None, tag=None, qa=None):
        self.heads = Heads(generation, classify, tag, qa)
        self.tokenizer = SeedOssTokenizer.from_pretrained(checkpoint)
        self.model_name = model_name
        api.state.gateway = self  # for routes defined outside this class (OpenAI API)

    @api.post("/v1/generate")
    async def generate(self, request: Request):
        try:
            body = await json_body(request)
            handle = self.heads.get("generate")
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
            return await self.heads.get(task).remote(await json_body(request))
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
        for task, handle in self.heads.deployed().items():
            try:
                await handle.ready.remote()
                status[task] = "ready"
            except Exception as e:
                status[task] = f"unavailable: {service_error(e).message}"
        ok = all(v == "ready" for v in status.values())
        if not ok:
            return error_response(Unavailable(f"not ready: {status}", retry_after=5))
        return {"status": "ok", "heads": status}
