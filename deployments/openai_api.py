"""OpenAI-compatible HTTP routes of the gateway (included into its FastAPI app): `GET /v1/models`,
`POST /v1/completions`, `POST /v1/chat/completions` (SSE ending with `data: [DONE]`), and vLLM's `POST /tokenize` /
`POST /detokenize` (also under `/v1/`), OpenAI's `POST /v1/embeddings`, vLLM's `POST /pooling`, and vLLM's pooling
shapes over the classification head: `POST /classify`, `POST /score` (also `/v1/`), `POST /rerank` (also `/v1/`,
`/v2/`). The request/response mapping lives in services/openai.py (services/pooling_api.py for the pooling shapes);
these routes are an adapter over the gateway core
(deployments/gateway_core.py): they parse, tokenize through the core's pool (the same `GenerateRequest.prompt_ids`
the native route and gRPC use), dispatch through the core and stream.

`router(core)` returns the routes bound to one `GatewayCore`; the Gateway includes them into the FastAPI app it
builds per replica. A new route goes inside `router`, using `core` (see deployments/gateway.py).

Errors found before the first byte of a stream (validation, prompt too long, unknown model) are ordinary HTTP 4xx
JSON bodies; a failure mid-stream is sent in-band as `data: {"error": ...}` followed by `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from seedoss.services.embeddings import EmbeddingRequest
from seedoss.services.errors import InvalidRequest
from seedoss.services.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_mapper,
    completion_mapper,
    model_list,
    rename_param,
    tokenize_response,
)
from seedoss.services.schemas import parse

from seedoss.services.pooling_api import ClassifyRequest as PoolingClassifyRequest
from seedoss.services.pooling_api import RerankRequest, ScoreRequest, classify_response, rerank_response, score_response
from seedoss.services.pooling_api import parse as parse_pooling

from .gateway_core import GatewayCore
from .ingress import body_schema, error_response, json_body, service_error, sse_response

_CREATED = int(time.time())


class EmbeddingsBody(EmbeddingRequest):
    """The body of `POST /v1/embeddings` and `POST /pooling`: the Embedding head's request plus the transport
    fields OpenAI and vLLM clients send (`model`, checked; `user`, dropped). Validated here, so a bad body is
    answered by the gateway and the OpenAPI document describes it (schemathesis fuzzes it, bench/fuzz.py)."""

    model: str | None = None
    user: str | None = None


def _error(e: BaseException, params: dict[str, str] | None = None):
    error = service_error(e)
    return error_response(rename_param(error, params) if params else error)


async def _merged(streams: list, firsts: list[dict]) -> AsyncIterator[tuple[int, dict]]:
    """(stream index, chunk) from several native streams as they come (the first chunk of each already fetched)."""
    for i, first in enumerate(firsts):
        yield i, first
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, stream):
        try:
            async for chunk in stream:
                await queue.put((i, chunk))
            await queue.put((i, done))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.cancel()


def router(core: GatewayCore) -> APIRouter:
    api = APIRouter()

    async def prepared(request: Request, request_cls, mapper_of, params: dict[str, str]):
        """Completions' and chat's common start: body, limits, parse, model check, tokenization in the core's
        pool, the response mapper. `params` gets the request's error-field renames as soon as they are known."""
        body = await json_body(request, core)
        core.limits.check_generation(body)
        req = request_cls.parse(body)
        params.update(req.error_params())
        core.check_model(req.model)
        prompts = await core.tokenized(req.native_bodies, core.tokenizer)
        return req, prompts, mapper_of(req, core.model_name, core.tokenizer, prompts)

    @api.get("/v1/models")
    async def list_models():
        return model_list(core.model_name, await core.max_model_len(), _CREATED)

    @api.post("/v1/completions", openapi_extra=body_schema(CompletionRequest))
    async def completions(request: Request):
        params = {}
        try:
            req, prompts, mapper = await prepared(request, CompletionRequest, completion_mapper, params)
            if not req.stream:
                calls = [asyncio.ensure_future(core.complete(p.body)) for p in prompts]
                try:
                    results = await asyncio.gather(*calls)
                except BaseException:
                    for call in calls:
                        call.cancel()
                    raise
                return mapper.response(results)
            streams, firsts = await core.open_streams([p.body for p in prompts])
        except Exception as e:
            return _error(e, params)

        async def chunks():
            async for i, native in _merged(streams, firsts):
                for chunk in mapper.chunks(i, native):
                    yield chunk
            if mapper.include_usage:
                yield mapper.usage_chunk()

        return sse_response(chunks(), streams, lambda e: rename_param(e, params))

    @api.post("/v1/chat/completions", openapi_extra=body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request):
        params = {}
        try:
            req, prompts, mapper = await prepared(request, ChatCompletionRequest, chat_mapper, params)
            if not req.stream:
                return mapper.response(await core.complete(prompts[0].body))
            streams, firsts = await core.open_streams([p.body for p in prompts])
        except Exception as e:
            return _error(e, params)

        async def chunks():
            for chunk in mapper.role_chunks():
                yield chunk
            async for _, native in _merged(streams, firsts):
                for chunk in mapper.chunks(native):
                    yield chunk
            if mapper.include_usage:
                yield mapper.usage_chunk()

        return sse_response(chunks(), streams, lambda e: rename_param(e, params))

    @api.post("/tokenize", openapi_extra=body_schema(TokenizeRequest))
    @api.post("/v1/tokenize", openapi_extra=body_schema(TokenizeRequest))
    async def tokenize(request: Request):
        try:
            body = await json_body(request, core)
            core.limits.check_generation(body)  # its prompt/messages characters
            req = TokenizeRequest.parse(body)
            core.check_model(req.model)
            ids = await core.tokenized(req.token_ids, core.tokenizer)
            return tokenize_response(ids, core.tokenizer, await core.max_model_len(), req.return_token_strs)
        except Exception as e:
            return _error(e)

    @api.post("/detokenize", openapi_extra=body_schema(DetokenizeRequest))
    @api.post("/v1/detokenize", openapi_extra=body_schema(DetokenizeRequest))
    async def detokenize(request: Request):
        try:
            req = DetokenizeRequest.model_validate(await json_body(request, core))
            core.check_model(req.model)
            return {"prompt": await core.tokenized(req.text, core.tokenizer)}
        except Exception as e:
            return _error(e)

    async def embed(request: Request, per_token: bool) -> dict:
        """The Embedding head's answer to an OpenAI/vLLM body (`model` checked, `user` dropped); `per_token`: every
        token's hidden state (`/pooling`), else pooled vectors (`pooling: none` then belongs to `/pooling`)."""
        body = await json_body(request, core)
        parse(EmbeddingsBody, body)  # the whole body, transport fields included (the head sees the rest again)
        core.check_model(body.pop("model", None))
        body.pop("user", None)
        if per_token:
            body["pooling"] = "none"
        elif body.get("pooling") == "none":
            raise InvalidRequest("pooling: none (per-token states) is served by /pooling", param="pooling")
        return await core.task("embed", body)

    @api.post("/v1/embeddings", openapi_extra=body_schema(EmbeddingsBody))
    async def embeddings(request: Request):
        """OpenAI's embeddings (plus our `pooling`, `normalize`, `truncate` extensions)."""
        try:
            result = await embed(request, per_token=False)
            return {**result, "model": core.model_name,
                    "usage": {**result["usage"], "total_tokens": result["usage"]["prompt_tokens"]}}
        except Exception as e:
            return _error(e)

    @api.post("/pooling", openapi_extra=body_schema(EmbeddingsBody))
    async def pooling(request: Request):
        """vLLM's `/pooling`: every token's final hidden state per input (`data[i].data`: [tokens][hidden])."""
        try:
            result = await embed(request, per_token=True)
            return {"object": "list", "model": core.model_name, "usage": result["usage"],
                    "data": [{"index": d["index"], "object": "pooling", "data": d["embedding"]}
                             for d in result["data"]]}
        except Exception as e:
            return _error(e)

    # --- vLLM-shape pooling routes over the classification head (services/pooling_api.py) -----------------------

    async def pooling_request(request: Request, cls):
        """The parsed body of a pooling route; the model is checked first."""
        req = parse_pooling(cls, await json_body(request, core))
        core.check_model(req.model)
        return req

    @api.post("/classify", openapi_extra=body_schema(PoolingClassifyRequest))
    async def vllm_classify(request: Request):
        """vLLM's `/classify`: `data[{index, label, probs, num_classes}]` (the native TEI shape is `/v1/classify`)."""
        try:
            req = await pooling_request(request, PoolingClassifyRequest)
            return classify_response(await core.task("classify", req.native(req.input)), core.model_name)
        except Exception as e:
            return _error(e)

    @api.post("/score", openapi_extra=body_schema(ScoreRequest))
    @api.post("/v1/score", openapi_extra=body_schema(ScoreRequest))
    async def score(request: Request):
        """vLLM's `/score`: text pairs through a single-label head (cross-encoder)."""
        try:
            req = await pooling_request(request, ScoreRequest)
            first, second = req.pairs()
            return score_response(await core.task("classify", req.native(first, second)), core.model_name)
        except Exception as e:
            return _error(e)

    @api.post("/rerank", openapi_extra=body_schema(RerankRequest))
    @api.post("/v1/rerank", openapi_extra=body_schema(RerankRequest))
    @api.post("/v2/rerank", openapi_extra=body_schema(RerankRequest))
    async def rerank(request: Request):
        """vLLM's `/rerank` (Jina and Cohere v1/v2 shape): documents ordered by the head's score against the query."""
        try:
            req = await pooling_request(request, RerankRequest)
            texts = req.texts()
            native = await core.task("classify", req.native([req.query] * len(texts), texts))
            return rerank_response(native, req, core.model_name)
        except Exception as e:
            return _error(e)

    return api
