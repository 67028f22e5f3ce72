"""The typed gRPC API (`proto/seedoss/v1/seedoss.proto`, service `seedoss.v1.SeedOss`) as methods of the Gateway.

Serve's gRPC proxy calls the Gateway method named like the RPC with the request message (and, because the methods
take a `grpc_context` parameter, a `RayServegRPCContext`); an async generator method is a server-streaming RPC.
Each method turns the message into the native request dict of the HTTP API, hands it to the gateway core
(deployments/gateway_core.py: the same admission, limits, validation, tokenization and dispatch as HTTP), and turns
the result back into the response message, so the front ends share validation, defaults and results.

Errors become gRPC statuses with the `ServiceError`'s code (`services/errors.py`: INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED, UNAVAILABLE, CANCELLED, UNAUTHENTICATED, INTERNAL) and its message as details; the details of
a bad-input error start with the offending field as the proto names it (``temperature: ...``,
``chat.messages.0.role: ...``). Unary methods set the code on the context and return an empty message (Serve's
documented way; the trailing metadata ``error-type``, ``error-param``, ``retry-after`` and, for server errors,
``error-id`` travel with it); the streaming `Generate` sets the code and raises (Serve wraps that into a
`gRPCStatusError` carrying the code). Every request message is held to `limits.max_body_bytes` (`ByteSize()`),
and generation requests to the generation limits, before anything else runs.
A client cancelling a `Generate` call cancels this generator: its `finally` cancels the stream from the Generation
replica, whose engine then aborts the request and frees its KV cache.
"""

from __future__ import annotations

import math
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from seedoss.proto.seedoss.v1 import seedoss_pb2 as pb
from seedoss.services.errors import InvalidRequest, ServiceError, Unavailable
from seedoss.services.reasoning import ChoiceSplitter

from .gateway_core import GatewayCore
from .ingress import service_error

# GenerateRequest fields with presence that map one-to-one onto the native request's fields.
_GENERATE_OPTIONAL = (
    "add_special_tokens", "n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "seed", "max_tokens", "min_tokens", "ignore_eos", "logprobs", "skip_special_tokens",
    "include_stop_str_in_output", "thinking_token_budget", "cache_salt",
)
_ANSWER_OPTIONAL = ("top_k", "max_answer_len", "max_seq_len", "doc_stride", "handle_impossible_answer",
                    "align_to_words", "strip_whitespace")
_TASK_RESPONSES = {"classify": pb.ClassifyResponse, "tag": pb.TagResponse, "qa": pb.AnswerResponse,
                   "embed": pb.EmbedResponse}
# Native field → proto field, for error details (the native chat fields live under `chat` in the proto).
_PARAM_NAMES = {"messages": "chat.messages", "chat_template_kwargs": "chat.chat_template_kwargs",
                "add_generation_prompt": "chat.add_generation_prompt", "prompt_token_ids": "prompt_token_ids.ids"}


# ------------------------------------------------------------------------------------------ proto → native


def struct_dict(struct: struct_pb2.Struct, field: str) -> dict[str, Any]:
    """A Struct as a dict; numbers are doubles in a Struct, integral ones come back as ints (a template printing
    ``thinking_budget`` must see ``512``, not ``512.0``). A Struct is JSON: NaN or infinity is an error naming
    `field`."""
    def fix(v):
        if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
            return int(v)
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v

    try:
        return fix(json_format.MessageToDict(struct))
    except ValueError:  # json_format refuses non-finite numbers
        raise InvalidRequest(f"{field}: numbers must be finite (NaN and infinity are not JSON)", param=field) from None


def chat_body(chat: pb.Chat) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": [{**struct_dict(m.extra, f"messages.{i}.extra"), "role": m.role, "content": m.content}
                     for i, m in enumerate(chat.messages)],
    }
    if chat.HasField("chat_template_kwargs"):
        body["chat_template_kwargs"] = struct_dict(chat.chat_template_kwargs, "chat_template_kwargs")
    if chat.HasField("add_generation_prompt"):
        body["add_generation_prompt"] = chat.add_generation_prompt
    return body


def prompt_body(request, which: str) -> dict[str, Any]:
    """The native prompt field of the `which` member of a prompt oneof (an empty one is an error naming it)."""
    if which == "prompt_token_ids":
        body = {"prompt_token_ids": list(request.prompt_token_ids.ids)}
        empty = not request.prompt_token_ids.ids
    elif which == "chat":
        body, empty = chat_body(request.chat), not request.chat.messages
    else:
        body, empty = {"prompt": request.prompt}, not request.prompt
    if empty:
        field = next(iter(body))
        raise InvalidRequest(f"{field}: is empty", param=field)
    return body


def generate_body(request: pb.GenerateRequest) -> dict[str, Any]:
    """The native `/v1/generate` body of a GenerateRequest (unset optional fields left out: server defaults)."""
    which = request.WhichOneof("prompt_input")
    if which is None:
        raise InvalidRequest("prompt: give one of prompt, prompt_token_ids, chat", param="prompt")
    body = prompt_body(request, which)
    for field in _GENERATE_OPTIONAL:
        if request.HasField(field):
            body[field] = getattr(request, field)
    if request.stop:
        body["stop"] = list(request.stop)
    if request.stop_token_ids:
        body["stop_token_ids"] = list(request.stop_token_ids)
    if request.HasField("structured_outputs"):
        body["structured_outputs"] = struct_dict(request.structured_outputs, "structured_outputs")
    return body


def classify_body(request: pb.ClassifyRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": list(request.inputs)}
    if request.HasField("top_k"):
        body["top_k"] = request.top_k
    if request.function_to_apply:
        body["function_to_apply"] = _enum_value(pb.FunctionToApply, request.function_to_apply, "FUNCTION_TO_APPLY_")
    for flag in ("raw_scores", "full_probabilities", "truncate"):
        if getattr(request, flag):
            body[flag] = True
    return body


def tag_body(request: pb.TagRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": list(request.inputs)}
    if request.aggregation_strategy:
        body["aggregation_strategy"] = _enum_value(pb.AggregationStrategy, request.aggregation_strategy,
                                                   "AGGREGATION_STRATEGY_")
    if request.HasField("ignore_labels"):
        body["ignore_labels"] = list(request.ignore_labels.values)
    if request.HasField("stride"):
        body["stride"] = request.stride
    if request.truncate:
        body["truncate"] = True
    return body


def answer_body(request: pb.AnswerRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"question": request.question, "context": request.context}
    for field in _ANSWER_OPTIONAL:
        if request.HasField(field):
            body[field] = getattr(request, field)
    return body


def embed_body(request: pb.EmbedRequest) -> dict[str, Any]:
    if request.texts and request.token_ids:
        raise InvalidRequest("texts: give texts or token_ids, not both", param="texts")
    body: dict[str, Any] = {"input": list(request.texts) or [list(t.ids) for t in request.token_ids]}
    for field in ("pooling", "normalize", "dimensions"):
        if request.HasField(field):
            body[field] = getattr(request, field)
    if request.truncate:
        body["truncate"] = True
    return body


def _enum_value(enum, number: int, prefix: str) -> str:
    try:
        return enum.Name(number).removeprefix(prefix).lower()
    except ValueError:  # a number this server does not know (newer client)
        field = "function_to_apply" if enum is pb.FunctionToApply else "aggregation_strategy"
        raise InvalidRequest(f"{field}: unknown value {number}", param=field) from None


# ------------------------------------------------------------------------------------------ native → proto


def generate_response(chunk: dict[str, Any]) -> pb.GenerateResponse:
    """One streamed chunk of `Generation.stream` (``{id, choices, usage?}``) as a GenerateResponse."""
    response = pb.GenerateResponse(id=chunk["id"])
    for c in chunk["choices"]:
        choice = response.choices.add(index=c["index"], text=c["text"], token_ids=c["token_ids"],
                                      reasoning=c.get("reasoning") or "")
        if c.get("finish_reason") is not None:
            choice.finish_reason = c["finish_reason"]
        stop = c.get("stop_reason")
        if isinstance(stop, str):
            choice.stop_string = stop
        elif isinstance(stop, int):
            choice.stop_token_id = stop
        for lp in c.get("logprobs") or ():
            choice.logprobs.add(token_id=lp["token_id"], logprob=lp["logprob"],
                                top_logprobs=[pb.TopLogprob(token_id=t["token_id"], logprob=t["logprob"])
                                              for t in lp["top_logprobs"]])
    if chunk.get("usage") is not None:
        fill(response.usage, chunk["usage"])
    return response


def task_response(task: str, result: dict[str, Any]):
    """A task head's JSON result as its response message (fields a newer head adds are skipped)."""
    if task == "tag":
        result = {**result, "results": [{"entities": entities} for entities in result["results"]]}
    elif task == "embed":
        result = {"embeddings": [{"values": d["embedding"]} for d in result["data"]], "usage": result["usage"]}
    return fill(_TASK_RESPONSES[task](), result)


def fill(message, data: dict[str, Any]):
    """`data`, a JSON result of ours, into `message` (returned) as `json_format.ParseDict(data, message,
    ignore_unknown_fields=True)` fills it — None leaves a field unset, a key the message lacks is skipped — for the
    kinds of fields our responses have (messages, repeated fields, scalars; no enums or maps), at a tenth of
    ParseDict's cost: it runs once per request on the gateway (ParseDict: 38 us for a classify reply)."""
    fields = message.DESCRIPTOR.fields_by_name
    for name, value in data.items():
        field = fields.get(name)
        if field is None or value is None:
            continue
        target = getattr(message, name)
        if field.message_type is not None and field.is_repeated:
            for item in value:
                fill(target.add(), item)
        elif field.message_type is not None:
            target.SetInParent()
            fill(target, value)
        elif field.is_repeated:
            target.extend(value)
        else:
            setattr(message, name, value)
    return message


# ------------------------------------------------------------------------------------------------ errors


def proto_param(param: str | None) -> str | None:
    """A native field path as the proto names it (``messages.0.role`` → ``chat.messages.0.role``)."""
    if param:
        for native, proto in _PARAM_NAMES.items():
            if param == native or param.startswith(native + "."):
                return proto + param[len(native):]
    return param


def error_details(error: ServiceError) -> str:
    """The status details: the message, starting with the offending field as the proto names it."""
    message, param = error.message, proto_param(error.param)
    if error.param and param != error.param and message.startswith(error.param):
        message = param + message[len(error.param):]
    elif param and not message.startswith((param, error.param.split(".")[0])):
        message = f"{param}: {message}"
    return message


def set_error(grpc_context, exc: BaseException) -> ServiceError:
    """Put `exc`'s status on the call's context (when there is one: a plain handle call has none)."""
    error = service_error(exc)
    if grpc_context is not None:
        grpc_context.set_code(getattr(grpc.StatusCode, error.grpc_code, grpc.StatusCode.INTERNAL))
        grpc_context.set_details(error_details(error))
        metadata = [("error-type", error.error_type)]
        if error.param:
            metadata.append(("error-param", proto_param(error.param)))
        if error.error_id is not None:
            metadata.append(("error-id", error.error_id))
        if getattr(error, "retry_after", None) is not None:
            metadata.append(("retry-after", str(math.ceil(error.retry_after))))
        grpc_context.set_trailing_metadata(metadata)
    return error


class GrpcMethods:
    """Mixed into the Gateway: the RPCs as an adapter over `self.core` (`GatewayCore`): a message becomes the
    native request dict, the core admits, validates, tokenizes and dispatches it, the result becomes a message."""

    core: GatewayCore

    def _admit(self, grpc_context, rpc: str, request) -> None:
        """API keys (from the call's metadata; a plain handle call has no context), then the message size: every
        message is held to HTTP's body limit (Serve's gRPC proxy itself accepts up to 2 GiB unless
        RAY_SERVE_GRPC_MAX_MESSAGE_SIZE is set on the proxy's node, as the KubeRay pods do)."""
        if grpc_context is not None:
            metadata = {k.lower(): v for k, v in grpc_context.invocation_metadata() if isinstance(v, str)}
            self.core.authenticate(f"/seedoss.v1.SeedOss/{rpc}", metadata)
        self.core.limits.check_body_size(request.ByteSize(), "gRPC message")

    async def _grpc_unary(self, grpc_context, rpc: str, request, empty, call):
        """`call()`'s message, or on error `empty` with the error's status set on the context."""
        try:
            self._admit(grpc_context, rpc, request)
            return await call()
        except Exception as e:
            set_error(grpc_context, e)
            if grpc_context is None:
                raise service_error(e) from None
            return empty

    async def _grpc_task(self, task: str, rpc: str, body_of, request, grpc_context):
        async def call():
            return task_response(task, await self.core.task(task, body_of(request)))

        return await self._grpc_unary(grpc_context, rpc, request, _TASK_RESPONSES[task](), call)

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None):
        streams = []
        try:
            self._admit(grpc_context, "Generate", request)
            body = generate_body(request)
            # chat output: thinking apart from the answer (not when constrained: that is an answer throughout)
            split = ChoiceSplitter() if "messages" in body and "structured_outputs" not in body else None
            _, native = await self.core.generation_body(body)
            streams, firsts = await self.core.open_streams([native])
            yield generate_response(split.apply(firsts[0]) if split else firsts[0])
            async for chunk in streams[0]:
                yield generate_response(split.apply(chunk) if split else chunk)
            streams = []  # finished: nothing to cancel
        except Exception as e:
            raise set_error(grpc_context, e) from None
        finally:
            for stream in streams:  # client cancelled (or an error): stop the generation, free its cache
                stream.cancel()

    async def Classify(self, request: pb.ClassifyRequest, grpc_context=None) -> pb.ClassifyResponse:
        return await self._grpc_task("classify", "Classify", classify_body, request, grpc_context)

    async def TagTokens(self, request: pb.TagRequest, grpc_context=None) -> pb.TagResponse:
        return await self._grpc_task("tag", "TagTokens", tag_body, request, grpc_context)

    async def AnswerQuestion(self, request: pb.AnswerRequest, grpc_context=None) -> pb.AnswerResponse:
        return await self._grpc_task("qa", "AnswerQuestion", answer_body, request, grpc_context)

    async def Embed(self, request: pb.EmbedRequest, grpc_context=None) -> pb.EmbedResponse:
        return await self._grpc_task("embed", "Embed", embed_body, request, grpc_context)

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context=None) -> pb.TokenizeResponse:
        async def call():
            which = request.WhichOneof("input")
            if which is None:
                raise InvalidRequest("prompt: give one of prompt, chat", param="prompt")
            body = prompt_body(request, which)
            if request.HasField("add_special_tokens"):
                body["add_special_tokens"] = request.add_special_tokens
            ids = await self.core.prompt_ids(body)
            response = pb.TokenizeResponse(token_ids=ids, count=len(ids))
            if request.return_token_strs:
                response.token_strs.extend(self.core.tokenizer.convert_ids_to_tokens(ids))
            return response

        return await self._grpc_unary(grpc_context, "Tokenize", request, pb.TokenizeResponse(), call)

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context=None) -> pb.ListModelsResponse:
        async def call():
            return pb.ListModelsResponse(models=[pb.Model(id=self.core.model_name, object="model", owned_by="seedoss",
                                                          tasks=list(self.core.heads.deployed()))])

        return await self._grpc_unary(grpc_context, "ListModels", request, pb.ListModelsResponse(), call)

    async def Health(self, request: pb.HealthRequest, grpc_context=None) -> pb.HealthResponse:
        """Like ``GET /health/ready`` (``/health/live`` with `liveness_only`); no credentials needed."""
        async def call():
            if request.liveness_only:
                return pb.HealthResponse(status="alive")
            status = await self.core.head_status()
            if any(v != "ready" for v in status.values()):
                raise Unavailable(f"not ready: {status}", retry_after=5)
            return pb.HealthResponse(status="ready", heads=status)

        return await self._grpc_unary(grpc_context, "Health", request, pb.HealthResponse(), call)
