"""Token classification with the contract of HF's ``TokenClassificationPipeline`` (transformers 5.24), reproduced
step for step: the parity tests compare against the pipeline itself.

- Items are ``{entity, score, index, word, start, end}`` for ``aggregation_strategy="none"`` and
  ``{entity_group, score, word, start, end}`` otherwise; ``start``/``end`` are character offsets into the text
  (non-ASCII included: a byte-level token holding part of a character spans that whole character), ``index`` is
  the token's position in the model input (0 is ``<seed:bos>``, which is never tagged).
- ``word`` is the token string (``"Ġworld"``) for ``none`` and the decoded text of the tokens for groups.
  One deliberate difference: for ``first``/``average``/``max`` HF decodes each word and then decodes those strings
  *again* as if they were tokens, which garbles a group holding a word without a leading space and Latin-1
  characters (``"Café in"`` comes back as ``"Caf\\ufffd in"``); here the group's tokens are decoded once.
- Word boundaries for ``first``/``average``/``max``: the pipeline's heuristic for tokenizers without a
  continuing-subword prefix (byte-level BPE): a token continues a word unless it starts the text or a space
  touches its first character.
- ``stride`` splits a long text into windows of the model context, consecutive windows sharing ``stride`` tokens,
  exactly as the pipeline's fast-tokenizer overflow does; entities are gathered per window and overlapping ones
  merged (the longer wins, then the higher score). As in HF, ``stride`` needs an aggregation strategy other than
  ``none``. Without ``stride`` a text longer than the context is an error unless ``truncate`` (HF silently
  truncates).
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationInfo, field_validator

from .errors import InvalidRequest
from .limits import Limits
from .schemas import (
    Forward, ServiceModel, Texts, Usage, as_numpy, fit_context, off_loop, parse, run_forward, softmax, special_prefix,
    text_size, window_ranges,
)

WORD_STRATEGIES = ("first", "average", "max")


class TaggingRequest(ServiceModel):
    inputs: Texts
    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] = "none"
    ignore_labels: list[str] = Field(default_factory=lambda: ["O"])
    stride: int | None = Field(None, ge=0, description="tokens shared by consecutive windows of a long text")
    truncate: bool = False

    @field_validator("stride")
    @classmethod
    def _stride_needs_aggregation(cls, stride: int | None, info: ValidationInfo) -> int | None:
        if stride is not None and info.data.get("aggregation_strategy") == "none":
            raise ValueError('stride merges entities across windows; choose an aggregation_strategy other than "none"')
        return stride


class Entity(BaseModel):
    entity: str | None = None  # aggregation_strategy "none"
    entity_group: str | None = None  # the other strategies
    score: float
    index: int | None = None  # "none" only
    word: str
    start: int
    end: int


class TaggingResponse(BaseModel):
    results: list[list[Entity]]  # per input, in text order
    usage: Usage


@dataclass
class Window:
    """A run of consecutive tokens of ``inputs[text_index]`` behind the tokenizer's special prefix."""

    text_index: int
    ids: list[int]  # prefix + the window's tokens: what the model sees
    offsets: list[tuple[int, int]]  # character offsets of the window's tokens (prefix excluded)


@dataclass
class _Token:
    """A token, or (first/average/max) a word: the ids it covers, its label and score, its character span."""

    ids: list[int]
    entity: str
    score: float
    start: int
    end: int
    index: int | None = None
    scores: np.ndarray | None = None  # the label distribution (for word aggregation)
    is_subword: bool = False


def preprocess(request: TaggingRequest, tokenizer, max_length: int, limits: Limits | None = None) -> list[Window]:
    """The windows of every input; `limits` bounds their total tokens before any window is built."""
    prefix = special_prefix(tokenizer)
    if request.stride is not None and request.stride >= max_length - len(prefix):
        raise InvalidRequest(f"stride must be below the window's {max_length - len(prefix)} text tokens",
                             param="stride")
    encoded = [tokenizer.encode_with_offsets(text, add_special_tokens=False) for text in request.inputs]
    if request.stride is None:
        spans = [[(0, len(ids))] for ids, _ in encoded]  # one window each (cut to the context by fit_context)
    else:
        spans = [window_ranges(len(ids), max_length - len(prefix), request.stride) for ids, _ in encoded]
    if limits is not None:
        total = sum(len(prefix) + min(b - a, max_length - len(prefix)) for s in spans for a, b in s)
        limits.check_task_tokens("inputs" if request.stride is None else "stride", total)
    windows = []
    for i, ((ids, offsets), text_spans) in enumerate(zip(encoded, spans)):
        if request.stride is None:
            kept = fit_context(prefix, ids, max_length, request.truncate, i)
            windows.append(Window(i, kept, offsets[: len(kept) - len(prefix)]))
            continue
        for begin, end in text_spans:
            windows.append(Window(i, prefix + ids[begin:end], offsets[begin:end]))
    return windows


def postprocess(logits, windows: list[Window], request: TaggingRequest, tokenizer, labels: list[str]
                ) -> list[list[Entity]]:
    """`logits` [tokens of all windows packed, labels] → the entities of each input."""
    logits = as_numpy(logits)
    per_text: list[list[Entity]] = [[] for _ in request.inputs]
    windows_per_text = [0] * len(request.inputs)
    at = 0
    for window in windows:
        n_prefix = len(window.ids) - len(window.offsets)
        scores = softmax(logits[at + n_prefix: at + len(window.ids)])
        at += len(window.ids)
        text = request.inputs[window.text_index]
        entities = _window_entities(text, window, scores, request.aggregation_strategy, tokenizer, labels)
        per_text[window.text_index] += [e for e in entities
                                        if e.entity not in request.ignore_labels
                                        and e.entity_group not in request.ignore_labels]
        windows_per_text[window.text_index] += 1
    return [_merge_overlapping(entities) if n > 1 else entities for entities, n in zip(per_text, windows_per_text)]


def _window_entities(text: str, window: Window, scores: np.ndarray, strategy: str, tokenizer, labels: list[str]
                     ) -> list[Entity]:
    n_prefix = len(window.ids) - len(window.offsets)
    tokens = []
    for k, (token_id, (start, end), token_scores) in enumerate(zip(window.ids[n_prefix:], window.offsets, scores)):
        best = int(token_scores.argmax())
        tokens.append(_Token(
            ids=[token_id], entity=labels[best], score=float(token_scores[best]), start=start, end=end,
            index=n_prefix + k, scores=token_scores,
            is_subword=start > 0 and " " not in text[start - 1: start + 1],
        ))
    if strategy == "none":
        words = tokenizer.convert_ids_to_tokens(window.ids[n_prefix:])
        return [Entity(entity=t.entity, score=t.score, index=t.index, word=w, start=t.start, end=t.end)
                for t, w in zip(tokens, words)]
    if strategy in WORD_STRATEGIES:
        tokens = [_aggregate_word(word, strategy, labels) for word in _split_words(tokens)]
    return [_group(group, tokenizer) for group in _split_groups(tokens)]


def _split_words(tokens: list[_Token]) -> list[list[_Token]]:
    words: list[list[_Token]] = []
    for token in tokens:
        if words and token.is_subword:
            words[-1].append(token)
        else:
            words.append([token])
    return words


def _aggregate_word(tokens: list[_Token], strategy: str, labels: list[str]) -> _Token:
    if strategy == "first":
        scores = tokens[0].scores
    elif strategy == "max":
        scores = max(tokens, key=lambda t: t.scores.max()).scores
    else:  # average
        scores = np.nanmean(np.stack([t.scores for t in tokens]), axis=0)
    best = int(scores.argmax())
    return _Token(ids=[i for t in tokens for i in t.ids], entity=labels[best], score=float(scores[best]),
                  start=tokens[0].start, end=tokens[-1].end)


def _tag(label: str) -> tuple[str, str]:
    """("B" | "I", entity type); labels without a B-/I- prefix count as continuations."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def _split_groups(tokens: list[_Token]) -> list[list[_Token]]:
    """Adjacent tokens of one entity type form a group; a B- label always opens a new one."""
    groups: list[list[_Token]] = []
    for token in tokens:
        bi, tag = _tag(token.entity)
        if groups and bi != "B" and tag == _tag(groups[-1][-1].entity)[1]:
            groups[-1].append(token)
        else:
            groups.append([token])
    return groups


def _group(tokens: list[_Token], tokenizer) -> Entity:
    return Entity(
        entity_group=tokens[0].entity.split("-", 1)[-1],
        score=float(np.nanmean([t.score for t in tokens])),
        word=tokenizer.decode([i for t in tokens for i in t.ids], skip_special_tokens=False),
        start=tokens[0].start,
        end=tokens[-1].end,
    )


def _merge_overlapping(entities: list[Entity]) -> list[Entity]:
    """Entities of overlapping windows, by start; of two that overlap the longer stays, on a tie the better."""
    if not entities:
        return entities
    entities = sorted(entities, key=lambda e: e.start)
    merged, previous = [], entities[0]
    for entity in entities:
        if previous.start <= entity.start < previous.end:
            length, previous_length = entity.end - entity.start, previous.end - previous.start
            if length > previous_length or (length == previous_length and entity.score > previous.score):
                previous = entity
        else:
            merged.append(previous)
            previous = entity
    merged.append(previous)
    return merged


class TaggingService:
    def __init__(self, tokenizer, labels: list[str], forward: Forward, *, max_length: int,
                 limits: Limits | None = None, executor: Executor | None = None):
        self.tokenizer = tokenizer
        self.executor = executor  # where tokenization and offset alignment run (`off_loop`)
        self.labels = list(labels)
        self.forward = forward
        self.max_length = max_length  # the model's context: the window size
        self.limits = limits or Limits()

    async def tag(self, request: TaggingRequest | dict) -> TaggingResponse:
        request = parse(TaggingRequest, request)
        self.limits.check_texts("inputs", request.inputs)
        size = text_size(request.inputs)
        windows = await off_loop(self.executor, preprocess, request, self.tokenizer, self.max_length, self.limits,
                                 size=size)
        logits = await run_forward(self.forward, [w.ids for w in windows])
        results = await off_loop(self.executor, postprocess, logits, windows, request, self.tokenizer, self.labels,
                                 size=size)
        return TaggingResponse(results=results,
                               usage=Usage(prompt_tokens=sum(len(w.ids) for w in windows)))
