"""Sequence classification with the contracts of TEI's ``/predict`` and vLLM's ``/classify``.

- Defaults follow TEI, not HF's pipeline: every label comes back, sorted by score, best first (HF's
  ``top_k=1`` default returns only the best one; ask for that with ``top_k: 1``).
- ``function_to_apply`` follows HF's text-classification pipeline (TEI agrees): by default softmax over the labels,
  sigmoid when the head has a single label; ``"none"`` returns raw logits. TEI's ``raw_scores: true`` means
  ``"none"``.
- ``full_probabilities`` (alias ``return_all_scores``) adds vLLM's ``probs``: every label's score in label order.
- Texts get the tokenizer's special tokens (``<seed:bos>``) as HF's tokenizer adds them; the head scores the last
  token. A text longer than the model's context is an error naming ``inputs`` unless ``truncate`` keeps its first
  tokens (TEI's ``truncate``).
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Literal

import numpy as np
from pydantic import AliasChoices, BaseModel, Field, ValidationInfo, field_validator

from .limits import Limits
from .schemas import (
    Forward, ServiceModel, Texts, Usage, as_numpy, fit_context, off_loop, parse, run_forward, sigmoid, softmax, special_prefix,
    text_size,
)


class ClassificationRequest(ServiceModel):
    inputs: Texts
    top_k: int | None = Field(None, ge=1, description="labels per input, best first; None: all")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = None
    raw_scores: bool = False
    full_probabilities: bool = Field(False, validation_alias=AliasChoices("full_probabilities", "return_all_scores"))
    truncate: bool = False
    text_pairs: list[str] | None = Field(
        None, description="second texts: inputs[i] is scored together with text_pairs[i], encoded as HF's "
                          "tokenizer(text, text_pair) does (a cross-encoder's query and document; vLLM's /score)")

    @field_validator("text_pairs")
    @classmethod
    def _pairs_match_inputs(cls, pairs: list[str] | None, info: ValidationInfo) -> list[str] | None:
        inputs = info.data.get("inputs")
        if pairs is not None and inputs is not None and len(pairs) != len(inputs):
            raise ValueError(f"text_pairs has {len(pairs)} texts for {len(inputs)} inputs")
        return pairs

    @field_validator("raw_scores")
    @classmethod
    def _no_function_with_raw_scores(cls, raw_scores: bool, info: ValidationInfo) -> bool:
        if raw_scores and info.data.get("function_to_apply") not in (None, "none"):
            raise ValueError("raw_scores returns logits; it cannot be combined with function_to_apply")
        return raw_scores


class LabelScore(BaseModel):
    label: str
    score: float


class Classification(BaseModel):
    predictions: list[LabelScore]  # best first, top_k of them
    probs: list[float] | None = None  # every label's score, in label order (when full_probabilities)


class ClassificationResponse(BaseModel):
    results: list[Classification]  # one per input, in order
    usage: Usage


def preprocess(request: ClassificationRequest, tokenizer, max_length: int) -> list[list[int]]:
    prefix = special_prefix(tokenizer)
    contents = tokenizer.encode_batch(request.inputs, add_special_tokens=False)
    if request.text_pairs is not None:  # the tokenizer's pair template: prefix A prefix B (SeedOss: <bos> A <bos> B)
        seconds = tokenizer.encode_batch(request.text_pairs, add_special_tokens=False)
        contents = [a + prefix + b for a, b in zip(contents, seconds)]
    return [fit_context(prefix, ids, max_length, request.truncate, i) for i, ids in enumerate(contents)]


def postprocess(logits, request: ClassificationRequest, labels: list[str]) -> list[Classification]:
    """`logits` [inputs, labels] from the head → one `Classification` per input."""
    logits = as_numpy(logits)
    function = request.function_to_apply or (
        "none" if request.raw_scores else "sigmoid" if len(labels) == 1 else "softmax")
    scores = {"softmax": softmax, "sigmoid": sigmoid, "none": np.asarray}[function](logits)
    results = []
    for row in scores.tolist():
        best_first = sorted(range(len(labels)), key=lambda i: -row[i])[: request.top_k]
        results.append(Classification(
            predictions=[LabelScore(label=labels[i], score=row[i]) for i in best_first],
            probs=row if request.full_probabilities else None,
        ))
    return results


class ClassificationService:
    def __init__(self, tokenizer, labels: list[str], forward: Forward, *, max_length: int,
                 limits: Limits | None = None, executor: Executor | None = None):
        self.tokenizer = tokenizer
        self.executor = executor  # where tokenization runs (`off_loop`)
        self.labels = list(labels)
        self.forward = forward
        self.max_length = max_length  # the model's context (max_position_embeddings)
        self.limits = limits or Limits()

    async def classify(self, request: ClassificationRequest | dict) -> ClassificationResponse:
        request = parse(ClassificationRequest, request)
        self.limits.check_texts("inputs", request.inputs)
        sequences = await off_loop(self.executor, preprocess, request, self.tokenizer, self.max_length,
                                   size=text_size(request.inputs, request.text_pairs or []))
        self.limits.check_task_tokens("inputs", sum(map(len, sequences)))
        logits = await run_forward(self.forward, sequences)
        return ClassificationResponse(results=postprocess(logits, request, self.labels),
                                      usage=Usage(prompt_tokens=sum(map(len, sequences))))
