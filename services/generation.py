"""Native generation API: request schema, prompt resolution, and response/stream chunk shapes."""

from __future__ import annotations

import json
from typing import Any

from jinja2 import TemplateError
from pydantic import ConfigDict, Field, model_validator

from seedoss.engine import RequestOutput
from seedoss.sampling import SamplingParams
from seedoss.tokenizer import SeedOssTokenizer

from .errors import InvalidRequest
from .structured import reject_guided, resolve

SAMPLING_FIELDS = set(SamplingParams.model_fields)
# What the validators below enforce, for the OpenAPI document (clients, schema-driven fuzzing): exactly one prompt.
ONE_PROMPT_SCHEMA = {"oneOf": [{"required": ["prompt"]}, {"required": ["prompt_token_ids"]}, {"required": ["messages"]}]}
CHAT_MESSAGES_SCHEMA = {"minItems": 1, "items": {"type": "object", "required": ["role", "content"], "properties": {
    "role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]}, "content": {"type": "string"}}}}


class GenerateRequest(SamplingParams):
    """`POST /v1/generate`: exactly one of `prompt`, `prompt_token_ids`, `messages`, plus vLLM's sampling set."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=ONE_PROMPT_SCHEMA)

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = Field(None, json_schema_extra=CHAT_MESSAGES_SCHEMA)
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    add_generation_prompt: bool = True
    add_special_tokens: bool = True
    stream: bool = False
    cache_salt: str | None = Field(None, min_length=1, description="only requests with the same salt share "
                                                                   "prefix-cache blocks (vLLM's field)")

    @model_validator(mode="before")
    @classmethod
    def _no_guided(cls, body):
        if isinstance(body, dict):
            reject_guided(body)
        return body

    @model_validator(mode="after")
    def _one_prompt(self):
        given = [k for k in ("prompt", "prompt_token_ids", "messages") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of prompt, prompt_token_ids, messages (got {given or 'none'})")
        if self.prompt == "" or self.prompt_token_ids == [] or self.messages == []:
            raise ValueError(f"{given[0]} is empty")
        return self

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(**{k: getattr(self, k) for k in SAMPLING_FIELDS})

    def prompt_ids(self, tokenizer: SeedOssTokenizer) -> list[int]:
        """The prompt's token ids; also checks `structured_outputs` against the tokenizer (400 on a bad grammar)."""
        if self.structured_outputs is not None:
            resolve(tokenizer, structured_outputs=self.structured_outputs)
        if self.prompt_token_ids is not None:
            return list(self.prompt_token_ids)
        if self.prompt is not None:
            return tokenizer.encode(self.prompt, add_special_tokens=self.add_special_tokens)
        try:
            return tokenizer.apply_chat_template(self.messages, tokenize=True, add_generation_prompt=self.add_generation_prompt,
                                                 **self.chat_template_kwargs)
        except TemplateError as e:  # the template's own checks (raise_exception) and undefined fields: meant for users
            raise InvalidRequest(f"messages could not be rendered with the chat template: {e.message}",
                                 param="messages") from None
        except Exception:  # TypeError and the like on malformed messages: their text is an internal repr
            raise InvalidRequest("messages could not be rendered with the chat template: check each message's role "
                                 "and content types", param="messages") from None


def choice_dict(output) -> dict[str, Any]:
    out = {"index": output.index, "text": output.text, "token_ids": output.token_ids,
           "finish_reason": output.finish_reason, "stop_reason": output.stop_reason}
    if output.logprobs is not None:
        out["logprobs"] = [{"token_id": lp.token_id, "logprob": lp.logprob,
                            "top_logprobs": [{"token_id": t, "logprob": v} for t, v in (lp.top or [])]}
                           for lp in output.logprobs]
    return out


def response_dict(result: RequestOutput, completion_tokens: int) -> dict[str, Any]:
    prompt_tokens = len(result.prompt_token_ids)
    return {
        "id": result.request_id,
        "choices": [choice_dict(o) for o in result.outputs],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens,
                  "prompt_tokens_details": {"cached_tokens": result.num_cached_tokens}},
    }


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
