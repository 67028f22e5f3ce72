"""OpenAI-compatible API: request schemas and the mapping to and from the native generation API (no Ray, no HTTP).

Requests (`POST /v1/completions`, `POST /v1/chat/completions`) are validated here and turned into native
`GenerateRequest` bodies (services/generation.py) carrying `prompt_token_ids`: the gateway tokenizes (the same
`GenerateRequest.prompt_ids` the native route uses, so prompts are identical), which also gives it the prompt for
`echo`, `return_token_ids` and usage. Native results and stream chunks are mapped back onto OpenAI's exact shapes:
`text_completion`, `chat.completion` and `chat.completion.chunk`.

Choices follow vLLM's OpenAI server where OpenAI leaves room:
- sampling fields a request leaves out get the checkpoint's `generation_config.json` defaults (vLLM's
  `--generation-config auto`; AppConfig `generation_config: none` turns that off), applied by the Generation
  deployment to every route alike, so the OpenAI routes and `/v1/generate` give the same results for the same fields;
- `max_tokens` defaults to 16 for completions (OpenAI's and vLLM's default) and to "the rest of the context" for chat;
  `max_completion_tokens` wins over `max_tokens`;
- several prompts in one completions request are served as one request each; choice `index` is
  `prompt_index * n + i`, usage is summed;
- token strings in logprobs are the tokenizer's decode of the single token with special tokens kept (vLLM's
  `convert_ids_list_to_tokens`: `tokenizer.decode([id])`), so a byte-level token holding part of a UTF-8 character
  reads as U+FFFD; chat logprobs carry the UTF-8 `bytes` of that string. Logprobs are the raw model distribution
  (log_softmax of the logits before penalties/temperature), clamped at -9999.0 as vLLM does (JSON has no -inf);
- completions `top_logprobs[i]` is a `{token: logprob}` dict of the chosen token and the `logprobs` most likely ones
  (OpenAI's "most likely tokens as well as the chosen token", up to logprobs + 1 entries); chat `top_logprobs` is the
  `top_logprobs` most likely tokens, most likely first;
- `text_offset` is vLLM's: the first token of a piece starts at the length of the text before it, each next one
  at the previous offset plus the length of the previous token string;
- `stop_reason` (vLLM): the matched stop string or stop token id, null for eos/length. `return_token_ids` (vLLM)
  adds `token_ids` to every choice/chunk and `prompt_token_ids` to the response/first chunk.

Not supported, answered with 400 naming the field: `logit_bias` (non-empty), `suffix`, `best_of` other than n,
`echo` together with `logprobs` (no prompt logprobs), `prompt_logprobs`, `functions`, `function_call` (use `tools`),
vLLM's removed `guided_*` fields (use `structured_outputs`), `audio`, `modalities` other than text,
`prediction`, `reasoning_effort` (use `chat_template_kwargs.thinking_budget`), `web_search_options`, `verbosity`,
`moderation`, `continue_final_message`, chat `echo`, non-text content parts, `stream_options` without `stream`,
`stream_options.continuous_usage_stats`. Fields that cannot change results are accepted and ignored: `user`,
`metadata`, `store`, `service_tier`, `prompt_cache_key`, `prompt_cache_options`, `prompt_cache_retention`,
`safety_identifier` (and `parallel_tool_calls` on completions). Any other unknown field is a 400 naming it.

Seed-OSS chat (services/reasoning.py, services/tool_calls.py): the thinking goes to `message.reasoning_content` and
`message.reasoning` (both names are read by clients; streamed as deltas of both), the answer to `content`; with
`tools` (and `tool_choice` not "none") generated calls become `message.tool_calls` (streamed as whole-call deltas) and
`finish_reason` "tool_calls"; `parallel_tool_calls: false` keeps the first call only. `tool_choice` "required" or a
named function constrains decoding to one call in the Seed-OSS format (services/tool_calls.call_grammar), so even a
weak model returns a well-formed call whose arguments fit the schema.

Structured outputs (both routes): `response_format` (text, json_object, json_schema) or vLLM's `structured_outputs`
(json, regex, choice, grammar, json_object), at most one constraint per request; a constrained chat output has no
thinking (it is the answer from its first token).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from seedoss.sampling import MAX_LOGPROBS
from seedoss.tokenizer import SeedOssTokenizer

from .errors import InvalidRequest, NotFound, ServiceError, from_exception
from .generation import CHAT_MESSAGES_SCHEMA, GenerateRequest
from .reasoning import ReasoningStream
from .structured import reject_guided, resolve
from .tool_calls import ToolCallStream, call_grammar, check_tools

LOGPROB_FLOOR = -9999.0  # vLLM's stand-in for -inf (JSON cannot carry it)
_TEXT_PARTS = {"type": "array", "items": {"type": "object", "required": ["type", "text"], "properties": {
    "type": {"const": "text"}, "text": {"type": "string"}}}}
# For the OpenAPI document (normalize_messages validates): content is a string, text parts or null
OPENAI_MESSAGES_SCHEMA = {"minItems": 1, "items": {"type": "object", "required": ["role"], "properties": {
    "role": CHAT_MESSAGES_SCHEMA["items"]["properties"]["role"],
    "content": {"anyOf": [{"type": "string"}, _TEXT_PARTS, {"type": "null"}]}}}}


def _empty(v: Any) -> bool:
    return v is None or v == {} or v == [] or v == ""


def _none_or(*allowed: Any) -> Callable[[Any], bool]:
    return lambda v: v is None or v in allowed


# field -> "this value changes nothing" (anything else is rejected as unsupported)
_UNSUPPORTED_COMMON: dict[str, Callable[[Any], bool]] = {
    "logit_bias": _empty,
    "prompt_logprobs": _none_or(),
}
_UNSUPPORTED_COMPLETION = {**_UNSUPPORTED_COMMON, "suffix": _empty}
_UNSUPPORTED_CHAT = {
    **_UNSUPPORTED_COMMON,
    "functions": _empty, "function_call": _none_or("none", "auto"),
    "audio": _none_or(), "modalities": lambda v: v is None or v == ["text"], "prediction": _none_or(),
    "reasoning_effort": _none_or(), "web_search_options": _none_or(), "verbosity": _none_or(), "moderation": _none_or(),
    "continue_final_message": _none_or(False), "echo": _none_or(False), "add_special_tokens": _none_or(False),
}
_UNSUPPORTED_TOKENIZE = {"continue_final_message": _none_or(False), "tools": _empty, "chat_template": _none_or()}
UNSUPPORTED = {"CompletionRequest": _UNSUPPORTED_COMPLETION, "ChatCompletionRequest": _UNSUPPORTED_CHAT,
               "TokenizeRequest": _UNSUPPORTED_TOKENIZE}
_IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
            "prompt_cache_options", "prompt_cache_retention", "safety_identifier")


def _parse(cls: type[BaseModel], body: dict[str, Any], unsupported: dict[str, Callable[[Any], bool]]):
    """Validate `body` as `cls`: unsupported fields with a value that matters, and unknown fields, are a 400 naming
    the field; harmless OpenAI fields (`_IGNORED`) are dropped."""
    body = dict(body)
    reject_guided(body)
    for name, harmless in unsupported.items():
        if name in body and not harmless(body.pop(name)):
            raise InvalidRequest(f"{name} is not supported by this server", param=name)
    for name in _IGNORED:
        if name not in cls.model_fields:
            body.pop(name, None)
    for name in body:
        if name not in cls.model_fields:
            raise InvalidRequest(f"{name}: unknown field", param=name)
    try:
        return cls.model_validate(body)
    except Exception as e:
        error = from_exception(e)
        error.message = error.message.replace("Value error, ", "")  # pydantic's prefix for our own ValueErrors
        error.args = (error.message,)
        raise error from None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False

    @field_validator("continuous_usage_stats")
    @classmethod
    def _no_continuous(cls, v):
        if v:
            raise ValueError("continuous_usage_stats is not supported (usage comes in the last chunk)")
        return v


class _OpenAIRequest(BaseModel):
    """Fields both routes share: OpenAI's sampling set plus vLLM's extras."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: Any = None  # str | list[str]: validated by the native schema
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False
    # structured outputs (services/structured.py): OpenAI's and vLLM's forms, at most one
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    thinking_token_budget: int | None = None  # hard cap on thinking tokens, then `</seed:think>` is forced
    cache_salt: str | None = Field(None, min_length=1)  # prefix-cache isolation (vLLM's field)

    @field_validator("n", mode="before")
    @classmethod
    def _n_not_null(cls, v):
        return 1 if v is None else v

    @classmethod
    def parse(cls, body: dict[str, Any]) -> "_OpenAIRequest":
        """Validate a request body; unsupported or unknown fields are a 400 naming the field."""
        request = _parse(cls, body, UNSUPPORTED[cls.__name__])
        if request.stream_options is not None and not request.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")
        return request

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _constraint(self, tokenizer: SeedOssTokenizer, grammar: str | None = None) -> dict[str, Any]:
        """`{"structured_outputs": ...}` for the native body when the output is constrained, else {}."""
        spec = resolve(tokenizer, response_format=self.response_format, structured_outputs=self.structured_outputs,
                       grammar=grammar)
        return {} if spec is None else {"structured_outputs": spec}

    def _sampling(self) -> dict[str, Any]:
        fields = ("n", "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "stop", "top_k",
                  "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "skip_special_tokens",
                  "include_stop_str_in_output", "thinking_token_budget", "cache_salt")
        return {k: getattr(self, k) for k in fields if getattr(self, k) is not None}


class CompletionRequest(_OpenAIRequest):
    """`POST /v1/completions` (OpenAI legacy completions + vLLM extras)."""

    prompt: Any = Field(json_schema_extra={"anyOf": [  # validated by _prompt: the schema is for the OpenAPI document
        {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
        {"type": "array", "items": {"type": "integer"}, "minItems": 1},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "minItems": 1}, "minItems": 1}]})
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    best_of: int | None = None
    add_special_tokens: bool = True

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        prompts = _prompt_list(v)
        for p in prompts:
            if p == "" or p == []:
                raise ValueError("prompt is empty")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v, info):
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("best_of other than n is not supported")
        return v

    def error_params(self) -> dict[str, str]:
        """Native field -> the field of this request to name in errors."""
        return _COMPLETION_PARAMS

    @property
    def prompts(self) -> list[str | list[int]]:
        return _prompt_list(self.prompt)

    def native_bodies(self, tokenizer: SeedOssTokenizer) -> list["NativePrompt"]:
        if self.echo and self.logprobs is not None:
            raise InvalidRequest("echo with logprobs is not supported (this server does not compute prompt logprobs)",
                                 param="echo")
        base = {**self._sampling(), "max_tokens": self.max_tokens, **self._constraint(tokenizer)}
        if self.logprobs is not None:
            base["logprobs"] = self.logprobs
        out = []
        for p in self.prompts:
            if isinstance(p, str):
                native = {"prompt": p, "add_special_tokens": self.add_special_tokens}
            else:
                bad = [t for t in p if not 0 <= t < tokenizer.vocab_size]  # before decode, which cannot take them
                if bad:
                    raise InvalidRequest(f"prompt: token ids {bad[:5]} are outside the vocabulary "
                                         f"[0, {tokenizer.vocab_size})", param="prompt")
                native = {"prompt_token_ids": p}
            ids = _native_prompt_ids({**base, **native}, tokenizer, _COMPLETION_PARAMS)
            text = p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=False)
            out.append(NativePrompt({**base, "prompt_token_ids": ids}, ids, text))
        return out


class ChatCompletionRequest(_OpenAIRequest):
    """`POST /v1/chat/completions` (OpenAI chat completions + vLLM extras)."""

    messages: list[dict[str, Any]] = Field(json_schema_extra=OPENAI_MESSAGES_SCHEMA)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
    parallel_tool_calls: bool | None = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, v):
        return normalize_messages(v)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v, info):
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return v

    def tool_setup(self) -> tuple[list[dict], str | None]:
        """(tools, choice): see services/tool_calls.check_tools."""
        return check_tools(self.tools, self.tool_choice)

    def error_params(self) -> dict[str, str]:
        """Native field -> the field of this request to name in errors."""
        if self.max_completion_tokens is not None:
            return {**_CHAT_PARAMS, "max_tokens": "max_completion_tokens"}
        return _CHAT_PARAMS

    def native_bodies(self, tokenizer: SeedOssTokenizer) -> list["NativePrompt"]:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        tools, choice = self.tool_setup()
        grammar = None
        if choice not in (None, "none"):  # required / named: decoding is constrained to one well-formed call
            grammar = call_grammar(tools, None if choice == "required" else choice, tokenizer)
        base = {**self._sampling(), "max_tokens": max_tokens, **self._constraint(tokenizer, grammar)}
        if self.logprobs:
            base["logprobs"] = self.top_logprobs or 0
        params = self.error_params()
        template_kwargs = dict(self.chat_template_kwargs or {})
        if tools:  # rendered into the system turn, as the released template does (also for tool_choice none, as vLLM)
            template_kwargs["tools"] = tools
        native = {"messages": self.messages, "chat_template_kwargs": template_kwargs,
                  "add_generation_prompt": self.add_generation_prompt}
        ids = _native_prompt_ids({**base, **native}, tokenizer, params)
        return [NativePrompt({**base, "prompt_token_ids": ids}, ids, None)]


class NativePrompt:
    """One native request: its body (with `prompt_token_ids`), the prompt ids, and the prompt text (completions)."""

    def __init__(self, body: dict[str, Any], prompt_ids: list[int], prompt_text: str | None):
        self.body, self.prompt_ids, self.prompt_text = body, prompt_ids, prompt_text


# native field -> the OpenAI field to blame in errors
_COMPLETION_PARAMS = {"prompt_token_ids": "prompt"}
_CHAT_PARAMS = {"prompt": "messages", "prompt_token_ids": "messages", "logprobs": "top_logprobs"}


def rename_param(error: ServiceError, params: dict[str, str]) -> ServiceError:
    """Blame the OpenAI field for an error the native layer raised about its own field."""
    old = error.param
    new = params.get(old) if old else None
    if new and new != old:
        error.param = new
        if re.match(rf"{re.escape(old)}\b", error.message):  # "max_tokens: ..." / "max_tokens=5000 exceeds ..."
            error.message = new + error.message[len(old):]
        error.args = (error.message,)
    return error


def _native_prompt_ids(body: dict[str, Any], tokenizer: SeedOssTokenizer, params: dict[str, str]) -> list[int]:
    """Validate a native body as `/v1/generate` would and tokenize its prompt the same way."""
    try:
        return GenerateRequest.model_validate(body).prompt_ids(tokenizer)
    except Exception as e:
        raise rename_param(from_exception(e), params) from None


def _prompt_list(v: Any) -> list[str | list[int]]:
    """OpenAI's prompt forms: str, list[str], list[int] (one tokenized prompt), list[list[int]]."""
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v:
        if all(isinstance(x, str) for x in v):
            return list(v)
        if all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            return [list(v)]
        if all(isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x) for x in v):
            return [list(x) for x in v]
    if v is None:
        raise ValueError("prompt is required")
    if v == []:
        raise ValueError("prompt is empty")
    raise ValueError("prompt must be a string, a list of strings, a list of token ids, or a list of token id lists")


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check chat messages and flatten text content parts the way vLLM does (joined with newlines)."""
    if not messages:
        raise ValueError("messages is empty")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message.get("role"), str):
            raise ValueError(f"message {i} has no role")
        message = dict(message)
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"message {i} content part {j}: only text parts are supported (got {kind!r})")
                texts.append(part["text"])
            message["content"] = "\n".join(texts)
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, a list of text parts, or null")
        if message.get("tool_calls"):
            message["tool_calls"] = _parsed_tool_calls(i, message["tool_calls"])
        out.append(message)
    return out


def _parsed_tool_calls(i: int, calls: Any) -> list[dict[str, Any]]:
    """OpenAI clients send an assistant turn's call arguments as a JSON string; the chat template renders each
    argument as a parameter, so it needs the object (vLLM parses them the same way)."""
    if not isinstance(calls, list):
        raise ValueError(f"message {i}: tool_calls must be a list")
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"message {i}: each tool call needs function.name")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise ValueError(f"message {i}: tool call arguments are not valid JSON") from None
        if not isinstance(arguments, dict):
            raise ValueError(f"message {i}: tool call arguments must be a JSON object")
        out.append({**call, "function": {**function, "arguments": arguments}})
    return out


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise NotFound(f"The model `{requested}` does not exist.", param="model")


def model_list(model_name: str, max_model_len: int | None, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "seedoss",
                                        "root": model_name, "parent": None, "max_model_len": max_model_len}]}


# --- tokenize / detokenize (vLLM's shapes) ---------------------------------------------------------------------

class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None  # default: True for prompt, False for messages (vLLM)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    @classmethod
    def parse(cls, body: dict[str, Any]) -> "TokenizeRequest":
        return _parse(cls, body, UNSUPPORTED[cls.__name__])

    def token_ids(self, tokenizer: SeedOssTokenizer) -> list[int]:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequest("give exactly one of prompt, messages", param="prompt")
        if self.messages is not None:
            if self.add_special_tokens:
                raise InvalidRequest("add_special_tokens with messages is not supported", param="add_special_tokens")
            try:
                messages = normalize_messages(self.messages)
            except ValueError as e:
                raise InvalidRequest(str(e), param="messages") from None
            body = {"messages": messages, "add_generation_prompt": self.add_generation_prompt,
                    "chat_template_kwargs": self.chat_template_kwargs or {}}
        else:
            body = {"prompt": self.prompt, "add_special_tokens": self.add_special_tokens is not False}
        return _native_prompt_ids(body, tokenizer, {})


def tokenize_response(ids: list[int], tokenizer: SeedOssTokenizer, max_model_len: int | None,
                      return_token_strs: bool) -> dict[str, Any]:
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids,
            "token_strs": tokenizer.convert_ids_to_tokens(ids) if return_token_strs else None}


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None
    tokens: list[int]

    def text(self, tokenizer: SeedOssTokenizer) -> str:
        bad = [t for t in self.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise InvalidRequest(f"token ids {bad[:5]} are outside the vocabulary [0, {tokenizer.vocab_size})",
                                 param="tokens")
        return tokenizer.decode(self.tokens, skip_special_tokens=False)


# --- responses ------------------------------------------------------------------------------------------------

def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class _Mapper:
    """Shared state of one OpenAI response: id, creation time, token strings, per-choice text length."""

    prefix = ""

    def __init__(self, model: str, tokenizer: SeedOssTokenizer, prompts: list[NativePrompt], n: int,
                 include_usage: bool = False, return_token_ids: bool = False, echo: bool = False):
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.tokenizer, self.prompts, self.n = model, tokenizer, prompts, n
        self.include_usage, self.return_token_ids, self.echo = include_usage, return_token_ids, echo
        self._token_strs: dict[int, str] = {}
        self.text_len: dict[int, int] = {}  # choice index -> characters sent so far
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
        self._finished: set[int] = set()

    def token_str(self, token_id: int) -> str:
        s = self._token_strs.get(token_id)
        if s is None:
            s = self._token_strs[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return s

    def _record_usage(self, native: dict[str, Any]) -> None:
        usage = native.get("usage")
        if usage:
            self.usage["prompt_tokens"] += usage["prompt_tokens"]
            self.usage["completion_tokens"] += usage["completion_tokens"]
            self.usage["cached_tokens"] += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)

    def usage_dict(self) -> dict[str, Any]:
        return _usage(self.usage["prompt_tokens"], self.usage["completion_tokens"], self.usage["cached_tokens"])

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._base(self.chunk_object), "choices": [], "usage": self.usage_dict()}

    chunk_object = ""


class CompletionMapper(_Mapper):
    prefix = "cmpl"
    chunk_object = "text_completion"

    def logprobs(self, entries: list[dict] | None, initial_offset: int) -> dict[str, Any] | None:
        """OpenAI legacy logprobs of one piece of a choice (vLLM's text_offset rule)."""
        if entries is None:
            return None
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        offset, last_len = initial_offset, None
        for e in entries:
            token = self.token_str(e["token_id"])
            if last_len is not None:
                offset += last_len
            last_len = len(token)
            tokens.append(token)
            token_logprobs.append(max(e["logprob"], LOGPROB_FLOOR))
            offsets.append(offset)
            top = {token: max(e["logprob"], LOGPROB_FLOOR)}
            for t in e.get("top_logprobs") or []:
                top.setdefault(self.token_str(t["token_id"]), max(t["logprob"], LOGPROB_FLOOR))
            top_logprobs.append(top)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}

    def _choice(self, prompt_index: int, native_choice: dict[str, Any], first: bool) -> dict[str, Any]:
        index = prompt_index * self.n + native_choice["index"]
        text = native_choice["text"]
        prompt = self.prompts[prompt_index]
        if self.echo and first:
            text = prompt.prompt_text + text
        before = self.text_len.get(index, 0)
        start = before + (len(prompt.prompt_text) if self.echo and first else 0)
        choice = {"index": index, "text": text,
                  "logprobs": self.logprobs(native_choice.get("logprobs"), start),
                  "finish_reason": native_choice["finish_reason"], "stop_reason": native_choice["stop_reason"]}
        if self.return_token_ids:
            choice["token_ids"] = native_choice["token_ids"]
            if first:
                choice["prompt_token_ids"] = prompt.prompt_ids
        self.text_len[index] = before + len(text)
        return choice

    def response(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        """The `text_completion` object for the native results of every prompt (in prompt order)."""
        choices = []
        for p, result in enumerate(results):
            self._record_usage(result)
            choices += [self._choice(p, c, True) for c in result["choices"]]
        return {**self._base("text_completion"), "choices": sorted(choices, key=lambda c: c["index"]),
                "usage": self.usage_dict(), "system_fingerprint": None}

    def chunks(self, prompt_index: int, native: dict[str, Any]) -> list[dict[str, Any]]:
        """OpenAI stream chunks (one per choice) for one native chunk of prompt `prompt_index`."""
        self._record_usage(native)
        out = []
        for c in native["choices"]:
            index = prompt_index * self.n + c["index"]
            first = index not in self.text_len
            if not (c["text"] or c["finish_reason"] or c.get("logprobs") or (self.return_token_ids and c["token_ids"])
                    or (first and self.echo)):
                continue
            chunk = {**self._base("text_completion"), "choices": [self._choice(prompt_index, c, first)]}
            if self.include_usage:
                chunk["usage"] = None
            out.append(chunk)
        return out


class ChatMapper(_Mapper):
    prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def logprobs(self, entries: list[dict] | None) -> dict[str, Any] | None:
        if entries is None:
            return None

        def item(token_id: int, logprob: float) -> dict[str, Any]:
            token = self.token_str(token_id)
            return {"token": token, "logprob": max(logprob, LOGPROB_FLOOR),
                    "bytes": list(token.encode("utf-8", errors="replace"))}

        return {"content": [{**item(e["token_id"], e["logprob"]),
                             "top_logprobs": [item(t["token_id"], t["logprob"]) for t in e.get("top_logprobs") or []]}
                            for e in entries], "refusal": None}

    def __init__(self, *args, tools: list[dict] | None = None, in_reasoning: bool = True,
                 parallel_tool_calls: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.tools, self.in_reasoning, self.parallel_tool_calls = tools, in_reasoning, parallel_tool_calls
        self._parsers: dict[int, tuple[ReasoningStream, ToolCallStream | None]] = {}
        self._calls_sent: dict[int, int] = {}

    def _parse(self, index: int, text: str, final: bool) -> tuple[str, str, list[dict]]:
        """(reasoning, content, new tool calls) of the next piece of choice `index`."""
        if index not in self._parsers:
            self._parsers[index] = (ReasoningStream(self.in_reasoning), ToolCallStream(self.tools) if self.tools else None)
        thinking, tools = self._parsers[index]
        reasoning, content = thinking.feed(text, final)
        calls: list[dict] = []
        if tools is not None:
            content, calls = tools.feed(content, final)
            if not self.parallel_tool_calls:
                calls = calls[:max(0, 1 - self._calls_sent.get(index, 0))]
        self._calls_sent[index] = self._calls_sent.get(index, 0) + len(calls)
        return reasoning, content, calls

    def _finish_reason(self, index: int, native_reason: str | None) -> str | None:
        return "tool_calls" if native_reason == "stop" and self._calls_sent.get(index) else native_reason

    def response(self, result: dict[str, Any]) -> dict[str, Any]:
        self._record_usage(result)
        choices = []
        for c in result["choices"]:
            reasoning, content, calls = self._parse(c["index"], c["text"], final=True)
            message = {"role": "assistant", "content": content or None, "reasoning_content": reasoning or None,
                       "reasoning": reasoning or None, "tool_calls": calls}
            choice = {"index": c["index"], "message": message,
                      "logprobs": self.logprobs(c.get("logprobs")),
                      "finish_reason": self._finish_reason(c["index"], c["finish_reason"]),
                      "stop_reason": c["stop_reason"]}
            if self.return_token_ids:
                choice["token_ids"] = c["token_ids"]
            choices.append(choice)
        out = {**self._base("chat.completion"), "choices": choices, "usage": self.usage_dict(),
               "system_fingerprint": None}
        if self.return_token_ids:
            out["prompt_token_ids"] = self.prompts[0].prompt_ids
        return out

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        chunk = {**self._base("chat.completion.chunk"), "choices": [choice], "system_fingerprint": None}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def role_chunks(self) -> list[dict[str, Any]]:
        """The opening chunk of every choice: `delta.role` (OpenAI sends it first, with empty content)."""
        out = []
        for i in range(self.n):
            choice = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}
            if self.return_token_ids:
                choice["token_ids"] = []
            chunk = self._chunk(choice)
            if self.return_token_ids and i == 0:
                chunk["prompt_token_ids"] = self.prompts[0].prompt_ids
            out.append(chunk)
        return out

    def chunks(self, native: dict[str, Any]) -> list[dict[str, Any]]:
        self._record_usage(native)
        out = []
        for c in native["choices"]:
            index = c["index"]
            sent_before = self._calls_sent.get(index, 0)
            reasoning, content, calls = self._parse(index, c["text"], final=bool(c["finish_reason"]))
            if not (reasoning or content or calls or c["finish_reason"] or c.get("logprobs")
                    or (self.return_token_ids and c["token_ids"])):
                continue
            delta: dict[str, Any] = {}
            if reasoning:
                delta["reasoning_content"] = delta["reasoning"] = reasoning
            if content or not (reasoning or calls or c["finish_reason"]):
                delta["content"] = content
            if calls:
                delta["tool_calls"] = [{"index": sent_before + k, **call} for k, call in enumerate(calls)]
            choice = {"index": index, "delta": delta, "logprobs": self.logprobs(c.get("logprobs")),
                      "finish_reason": self._finish_reason(index, c["finish_reason"])}
            if c["finish_reason"]:
                choice["stop_reason"] = c["stop_reason"]
            if self.return_token_ids:
                choice["token_ids"] = c["token_ids"]
            out.append(self._chunk(choice))
        return out


def completion_mapper(request: CompletionRequest, model: str, tokenizer: SeedOssTokenizer,
                      prompts: list[NativePrompt]) -> CompletionMapper:
    return CompletionMapper(model, tokenizer, prompts, request.n, request.include_usage, request.return_token_ids,
                            bool(request.echo))


def chat_mapper(request: ChatCompletionRequest, model: str, tokenizer: SeedOssTokenizer,
                prompts: list[NativePrompt]) -> ChatMapper:
    tools, choice = request.tool_setup()
    return ChatMapper(model, tokenizer, prompts, request.n, request.include_usage, request.return_token_ids,
                      tools=tools if choice != "none" else None,
                      in_reasoning="structured_outputs" not in prompts[0].body,  # constrained from the first token
                      parallel_tool_calls=request.parallel_tool_calls is not False)
