"""vLLM-shape pooling routes over the classification head: `POST /classify`, `POST /score` and `POST /rerank`
(also Jina's and Cohere's rerank shape), beside the native `/v1/classify` (TEI shape).

- `/classify` `{model?, input: str | [str]}` → `{id, object: "list", created, model,
  data: [{index, label, probs, num_classes}], usage}`: `probs` are every label's score in label order (softmax,
  sigmoid for a single-label head, as vLLM's classifier pooler), `label` the best one.
- `/score` `{model?, text_1: str | [str], text_2: str | [str]}` → `data: [{index, object: "score", score}]`: each
  pair (one `text_1` against every `text_2`, or equal-length lists zipped) run through the head as a cross-encoder
  (the tokenizer's pair encoding), score = sigmoid of the single logit. Needs a single-label head, as vLLM does.
- `/rerank` `{model?, query, documents: [str | {text}], top_n?, return_documents?}` → `{id, model, usage,
  results: [{index, relevance_score, document?: {text}}]}` best first (Jina / Cohere v2).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import InvalidRequest


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    user: str | None = None  # accepted and ignored (OpenAI)

    @staticmethod
    def native(inputs: list[str], pairs: list[str] | None = None) -> dict[str, Any]:
        """The native classify body (every label's score; pairs for cross-encoding)."""
        body: dict[str, Any] = {"inputs": inputs, "full_probabilities": True}
        if pairs is not None:
            body["text_pairs"] = pairs
        return body


def _texts(v: Any, name: str) -> list[str]:
    texts = [v] if isinstance(v, str) else v
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings")
    return texts


class ClassifyRequest(_Body):
    input: str | list[str]

    @field_validator("input")
    @classmethod
    def _input(cls, v):
        return _texts(v, "input")


class ScoreRequest(_Body):
    text_1: str | list[str]
    text_2: str | list[str]

    @field_validator("text_1", "text_2")
    @classmethod
    def _texts(cls, v, info):
        return _texts(v, info.field_name)

    def pairs(self) -> tuple[list[str], list[str]]:
        first, second = self.text_1, self.text_2
        if len(first) == 1:
            first = first * len(second)
        if len(first) != len(second):
            raise InvalidRequest(f"text_1 has {len(self.text_1)} texts and text_2 {len(self.text_2)}: give one "
                                 "text_1, or as many as text_2", param="text_2")
        return first, second


class RerankRequest(_Body):
    query: str
    documents: list[str | dict[str, Any]] = Field(min_length=1)
    top_n: int | None = Field(None, ge=0)
    return_documents: bool = True

    @field_validator("documents")
    @classmethod
    def _documents(cls, v):
        for i, d in enumerate(v):
            if isinstance(d, dict) and not isinstance(d.get("text"), str):
                raise ValueError(f"documents.{i} must be a string or {{'text': str}}")
        return v

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d["text"] for d in self.documents]


def _usage(native: dict[str, Any]) -> dict[str, Any]:
    tokens = native["usage"]["prompt_tokens"]
    return {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0, "prompt_tokens_details": None}


def classify_response(native: dict[str, Any], model: str) -> dict[str, Any]:
    data = []
    for i, result in enumerate(native["results"]):
        probs = result["probs"]
        data.append({"index": i, "label": result["predictions"][0]["label"], "probs": probs,
                     "num_classes": len(probs)})
    return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
            "data": data, "usage": _usage(native)}


def pair_scores(native: dict[str, Any]) -> list[float]:
    """The single-label head's sigmoid score of each pair; a multi-label head cannot score pairs (vLLM agrees)."""
    scores = []
    for result in native["results"]:
        if len(result["probs"]) != 1:
            raise InvalidRequest(f"scoring needs a single-label classification head (a cross-encoder); this one has "
                                 f"{len(result['probs'])} labels", param="model")
        scores.append(result["probs"][0])
    return scores


def score_response(native: dict[str, Any], model: str) -> dict[str, Any]:
    return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(pair_scores(native))],
            "usage": _usage(native)}


def rerank_response(native: dict[str, Any], request: RerankRequest, model: str) -> dict[str, Any]:
    scores = pair_scores(native)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[: request.top_n or None]
    texts = request.texts()
    results = []
    for i in order:
        item = {"index": i, "relevance_score": scores[i]}
        if request.return_documents:
            item["document"] = {"text": texts[i]}
        results.append(item)
    tokens = native["usage"]["prompt_tokens"]
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": model, "usage": {"prompt_tokens": tokens,
                                                                          "total_tokens": tokens},
            "results": results}


def parse(cls: type[_Body], body: Any) -> _Body:
    """Validate a pooling body: a bad or unknown field is a 400 naming it."""
    try:
        return cls.model_validate(body)
    except ValueError as e:
        errors = e.errors() if hasattr(e, "errors") else []
        param = ".".join(str(p) for p in errors[0]["loc"]) if errors and errors[0].get("loc") else None
        message = errors[0]["msg"].replace("Value error, ", "") if errors else str(e)
        raise InvalidRequest(f"{param}: {message}" if param else message, param=param) from None
