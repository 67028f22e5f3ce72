"""OpenAI-compatible HTTP routes of the gateway (included into its FastAPI app): `GET /v1/models`,
`POST /v1/completions`, `POST /v1/chat/completions` (SSE ending with `data: [DONE]`), vLLM's `POST /tokenize` /
`POST /detokenize` (also under `/v1/`), and vLLM's pooling shapes over the classification head: `POST /classify`,
`POST /score` (also `/v1/`), `POST /rerank` (also `/v1/`, `/v2/`). The request/response mapping lives in services/openai.py; these routes only
tokenize (in the gateway, with the same code the native route uses), call the Generation deployment and stream.

Errors found before the first byte of a stream (validation, prompt too long, unknown model) are ordinary HTTP 4xx
JSON bodies; a failure mid-stream is sent in-band as `data: {"error": ...}` followed by `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from services.errors import InvalidRequest
from services.openai import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, chat_mapper, check_model,
    completion_mapper, model_list, rename_param, tokenize_response,
)

from services.pooling_api import ClassifyRequest as PoolingClassifyRequest
from services.pooling_api import RerankRequest, ScoreRequest, classify_response, rerank_response, score_response
from services.pooling_api import parse as parse_pooling

from .ingress import body_schema, error_response, json_body, service_error, sse_response

router = APIRouter()
_CREATED = int(time.time())
_max_model_len: dict[int, int] = {}  # id(gateway) -> the engine's context length, once known


async def max_model_len(gateway) -> int | None:
    """The engine's context length (prompt + output), asked of the Generation deployment once; the tokenizer's
    `model_max_length` if that deployment cannot say (an older Generation without `max_model_len`)."""
    known = _max_model_len.get(id(gateway))
    if known is None:
        try:
            known = _max_model_len[id(gateway)] = int(await gateway.heads.get("generate").max_model_len.remote())
        except Exception as e:
            known = gateway.tokenizer.model_max_length
            if "does not exist" in str(e):  # Serve's answer for a missing method: remember the fallback
                _max_model_len[id(gateway)] = known
    return known


def _error(e: BaseException, params: dict[str, str] | None = None):
    error = service_error(e)
    return error_response(rename_param(error, params) if params else error)


def _cancel(responses) -> None:
    for r in responses:
        try:
            r.cancel()
        except Exception:
            pass


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
        _cancel(streams)


async def _start_streams(heads, prompts) -> tuple[list, list[dict]]:
    """Start one native stream per prompt and fetch each first chunk (errors surface here, before any byte)."""
    streams = [heads.stream(p.body) for p in prompts]
    try:
        firsts = [await s.__anext__() for s in streams]
    except BaseException:
        _cancel(streams)
        raise
    return streams, firsts


@router.get("/v1/models")
async def list_models(request: Request):
    gateway = request.app.state.gateway
    return model_list(gateway.model_name, await max_model_len(gateway), _CREATED)


@router.post("/v1/completions", openapi_extra=body_schema(CompletionRequest))
async def completions(request: Request):
    gateway = request.app.state.gateway
    params = None
    try:
        body = await json_body(request)
        gateway.limits.check_generation(body)
        req = CompletionRequest.parse(body)
        params = req.error_params()
        check_model(req.model, gateway.model_name)
        prompts = req.native_bodies(gateway.tokenizer)
        mapper = completion_mapper(req, gateway.model_name, gateway.tokenizer, prompts)
        if not req.stream:
            calls = [asyncio.ensure_future(gateway.heads.call("generate", p.body, "complete")) for p in prompts]
            try:
                results = await asyncio.gather(*calls)
            except BaseException:
                _cancel(calls)
                raise
            return mapper.response(results)
        streams, firsts = await _start_streams(gateway.heads, prompts)
    except Exception as e:
        return _error(e, params)

    async def chunks():
        async for i, native in _merged(streams, firsts):
            for chunk in mapper.chunks(i, native):
                yield chunk
        if mapper.include_usage:
            yield mapper.usage_chunk()

    return sse_response(chunks(), streams, lambda e: rename_param(e, params or {}))


@router.post("/v1/chat/completions", openapi_extra=body_schema(ChatCompletionRequest))
async def chat_completions(request: Request):
    gateway = request.app.state.gateway
    params = None
    try:
        body = await json_body(request)
        gateway.limits.check_generation(body)
        req = ChatCompletionRequest.parse(body)
        params = req.error_params()
        check_model(req.model, gateway.model_name)
        prompts = req.native_bodies(gateway.tokenizer)
        mapper = chat_mapper(req, gateway.model_name, gateway.tokenizer, prompts)
        if not req.stream:
            return mapper.response(await gateway.heads.call("generate", prompts[0].body, "complete"))
        streams, firsts = await _start_streams(gateway.heads, prompts)
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

    return sse_response(chunks(), streams, lambda e: rename_param(e, params or {}))


@router.post("/tokenize", openapi_extra=body_schema(TokenizeRequest))
@router.post("/v1/tokenize", openapi_extra=body_schema(TokenizeRequest))
async def tokenize(request: Request):
    gateway = request.app.state.gateway
    try:
        body = await json_body(request)
        gateway.limits.check_generation(body)  # its prompt/messages characters
        req = TokenizeRequest.parse(body)
        check_model(req.model, gateway.model_name)
        ids = req.token_ids(gateway.tokenizer)
        return tokenize_response(ids, gateway.tokenizer, await max_model_len(gateway), req.return_token_strs)
    except Exception as e:
        return _error(e)


@router.post("/detokenize", openapi_extra=body_schema(DetokenizeRequest))
@router.post("/v1/detokenize", openapi_extra=body_schema(DetokenizeRequest))
async def detokenize(request: Request):
    gateway = request.app.state.gateway
    try:
        req = DetokenizeRequest.model_validate(await json_body(request))
        check_model(req.model, gateway.model_name)
        return {"prompt": req.text(gateway.tokenizer)}
    except Exception as e:
        return _error(e)


async def _embed(request: Request, per_token: bool) -> dict:
    """The Embedding head's answer to an OpenAI/vLLM body (`model` checked, `user` dropped); `per_token`: every
    token's hidden state (`/pooling`), else pooled vectors (`pooling: none` then belongs to `/pooling`)."""
    gateway = request.app.state.gateway
    body = await json_body(request)
    check_model(body.pop("model", None), gateway.model_name)
    body.pop("user", None)
    if per_token:
        body["pooling"] = "none"
    elif body.get("pooling") == "none":
        raise InvalidRequest("pooling: none (per-token states) is served by /pooling", param="pooling")
    return await gateway.heads.call("embed", body)


@router.post("/v1/embeddings")
async def embeddings(request: Request):
    """OpenAI's embeddings (plus our `pooling`, `normalize`, `truncate` extensions)."""
    try:
        result = await _embed(request, per_token=False)
        return {**result, "model": request.app.state.gateway.model_name,
                "usage": {**result["usage"], "total_tokens": result["usage"]["prompt_tokens"]}}
    except Exception as e:
        return _error(e)


@router.post("/pooling")
async def pooling(request: Request):
    """vLLM's `/pooling`: every token's final hidden state per input (`data[i].data`: [tokens][hidden])."""
    try:
        result = await _embed(request, per_token=True)
        return {"object": "list", "model": request.app.state.gateway.model_name, "usage": result["usage"],
                "data": [{"index": d["index"], "object": "pooling", "data": d["embedding"]} for d in result["data"]]}
    except Exception as e:
        return _error(e)


# --- vLLM-shape pooling routes over the classification head (services/pooling_api.py) ---------------------------

async def _classify_call(request: Request, cls):
    """(gateway, parsed body, native call) for a pooling route; the model is checked first."""
    gateway = request.app.state.gateway
    req = parse_pooling(cls, await json_body(request))
    check_model(req.model, gateway.model_name)
    return gateway, req


@router.post("/classify", openapi_extra=body_schema(PoolingClassifyRequest))
async def vllm_classify(request: Request):
    """vLLM's `/classify`: `data[{index, label, probs, num_classes}]` (the native TEI shape is `/v1/classify`)."""
    try:
        gateway, req = await _classify_call(request, PoolingClassifyRequest)
        native = await gateway.heads.call("classify", req.native(req.input))
        return classify_response(native, gateway.model_name)
    except Exception as e:
        return _error(e)


@router.post("/score", openapi_extra=body_schema(ScoreRequest))
@router.post("/v1/score", openapi_extra=body_schema(ScoreRequest))
async def score(request: Request):
    """vLLM's `/score`: text pairs through a single-label head (cross-encoder)."""
    try:
        gateway, req = await _classify_call(request, ScoreRequest)
        first, second = req.pairs()
        return score_response(await gateway.heads.call("classify", req.native(first, second)), gateway.model_name)
    except Exception as e:
        return _error(e)


@router.post("/rerank", openapi_extra=body_schema(RerankRequest))
@router.post("/v1/rerank", openapi_extra=body_schema(RerankRequest))
@router.post("/v2/rerank", openapi_extra=body_schema(RerankRequest))
async def rerank(request: Request):
    """vLLM's `/rerank` (Jina and Cohere v1/v2 shape): documents ordered by the head's score against the query."""
    try:
        gateway, req = await _classify_call(request, RerankRequest)
        texts = req.texts()
        native = await gateway.heads.call("classify", req.native([req.query] * len(texts), texts))
        return rerank_response(native, req, gateway.model_name)
    except Exception as e:
        return _error(e)
