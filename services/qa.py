"""Extractive question answering with the contract of HF's ``QuestionAnsweringPipeline`` (transformers removed it
in 5.3; this is the reference now): ``[{score, start, end, answer}]`` with character offsets into the context,
``answer == context[start:end]``.

Input layout: ``<seed:bos> question <seed:bos> context`` — the SeedOss tokenizer's pair encoding, i.e. what HF's
``tokenizer(question, context)`` gives and so what a QA head fine-tuned with HF's tooling has seen. Position 0
plays the part of BERT's [CLS]: its start and end probabilities make the "no answer" score. Only context tokens
can start or end an answer.

Decoding, as the pipeline does:
- a context longer than ``max_seq_len`` (default ``min(384, model context)``) minus the question is split into
  windows sharing ``doc_stride`` tokens (default ``min(128, max_seq_len // 2)``, lowered to fit a long question);
- per window, start and end logits are softmaxed over position 0 and the context tokens (question and separator
  excluded); a span scores ``p_start * p_end``, ends at or after its start and is at most ``max_answer_len``
  tokens; each window contributes its ``top_k`` best spans;
- spans with the same text (case-insensitive) are one answer whose scores add up, then the ``top_k`` best answers
  are returned; with ``handle_impossible_answer`` the no-answer candidate ``{score, start: 0, end: 0, answer: ""}``
  competes with them, scored by the smallest ``p_start[0] * p_end[0]`` over the windows.

Answer boundaries: with ``align_to_words`` a span grows to whole words of its window, a word being tokens not
separated by whitespace (tokens sharing a character always belong together). Byte-level tokens carry the space
before a word, so answers are stripped of surrounding whitespace — HF's pipeline would return ``" Paris"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, Field, ValidationInfo, field_validator

from .errors import InvalidRequest
from .limits import Limits
from .schemas import Forward, ServiceModel, Text, Usage, as_numpy, parse, run_forward, softmax, window_ranges

DEFAULT_MAX_SEQ_LEN = 384
DEFAULT_DOC_STRIDE = 128


class QARequest(ServiceModel):
    question: Text
    context: Text
    top_k: int = Field(1, ge=1)
    max_answer_len: int = Field(15, ge=1, description="tokens")
    max_seq_len: int | None = Field(None, ge=4, description="tokens per window, question included")
    doc_stride: int | None = Field(None, ge=0, description="context tokens shared by consecutive windows")
    handle_impossible_answer: bool = False
    align_to_words: bool = True

    @field_validator("doc_stride")
    @classmethod
    def _stride_below_window(cls, doc_stride: int | None, info: ValidationInfo) -> int | None:
        max_seq_len = info.data.get("max_seq_len")
        if doc_stride is not None and max_seq_len is not None and doc_stride >= max_seq_len:
            raise ValueError(f"doc_stride must be below max_seq_len ({max_seq_len})")
        return doc_stride


class Answer(BaseModel):
    score: float
    start: int
    end: int
    answer: str


class QAResponse(BaseModel):
    answers: list[Answer]  # best first
    usage: Usage


@dataclass
class QAWindow:
    ids: list[int]  # bos, question, bos, the window's context tokens
    context_start: int  # position of the first context token in `ids`
    offsets: list[tuple[int, int]]  # character offsets of the window's context tokens
    word_starts: list[bool]  # per context token: does it begin a word


def preprocess(request: QARequest, tokenizer, max_length: int, limits: Limits | None = None) -> list[QAWindow]:
    """The windows of the context; `limits` bounds their total tokens before any window is built."""
    max_seq_len = request.max_seq_len or min(DEFAULT_MAX_SEQ_LEN, max_length)
    if max_seq_len > max_length:
        raise InvalidRequest(f"max_seq_len must not exceed the model's context ({max_length})", param="max_seq_len")
    bos = tokenizer.bos_token_id
    question = tokenizer.encode(request.question, add_special_tokens=False)
    head = [bos, *question, bos]
    budget = max_seq_len - len(head)  # context tokens per window
    if budget < 1:
        raise InvalidRequest(f"the question takes {len(question)} tokens, leaving no room for context within "
                             f"max_seq_len {max_seq_len}", param="question")
    stride = request.doc_stride
    if stride is None:
        stride = min(DEFAULT_DOC_STRIDE, max_seq_len // 2, budget - 1)
    elif stride >= budget:
        raise InvalidRequest(f"doc_stride must be below the {budget} context tokens a window holds with this "
                             "question", param="doc_stride")
    ids, offsets = tokenizer.encode_with_offsets(request.context, add_special_tokens=False)
    ranges = window_ranges(len(ids), budget, stride)
    if limits is not None:
        limits.check_task_tokens("context" if request.doc_stride is None else "doc_stride",
                                 sum(len(head) + b - a for a, b in ranges))
    word_starts = _word_starts(request.context, offsets)
    return [QAWindow(head + ids[a:b], len(head), offsets[a:b], word_starts[a:b]) for a, b in ranges]


def _word_starts(text: str, offsets: list[tuple[int, int]]) -> list[bool]:
    starts = []
    for i, (start, _) in enumerate(offsets):
        previous_end = offsets[i - 1][1] if i else 0
        starts.append(i == 0 or (start >= previous_end and (
            text[start: start + 1].isspace() or text[previous_end - 1: previous_end].isspace())))
    return starts


def postprocess(start_logits, end_logits, windows: list[QAWindow], request: QARequest) -> list[Answer]:
    """Start and end logits [tokens of all windows packed] → the best answers."""
    start_logits, end_logits = as_numpy(start_logits), as_numpy(end_logits)
    answers: dict[str, Answer] = {}
    null_score = 1.0
    at = 0
    for window in windows:
        keep = np.r_[at, at + window.context_start: at + len(window.ids)]  # position 0 and the context
        at += len(window.ids)
        p_start, p_end = softmax(start_logits[keep]), softmax(end_logits[keep])
        null_score = min(null_score, float(p_start[0] * p_end[0]))
        for s, e, score in _best_spans(p_start[1:], p_end[1:], request.top_k, request.max_answer_len):
            start, end = _char_span(request.context, window, s, e, request.align_to_words)
            text = request.context[start:end]
            if text.lower() in answers:
                answers[text.lower()].score += score
            else:
                answers[text.lower()] = Answer(score=score, start=start, end=end, answer=text)
    candidates = list(answers.values())
    if request.handle_impossible_answer:
        candidates.append(Answer(score=null_score, start=0, end=0, answer=""))
    return sorted(candidates, key=lambda a: -a.score)[: request.top_k]


def _best_spans(p_start: np.ndarray, p_end: np.ndarray, k: int, max_answer_len: int
                ) -> list[tuple[int, int, float]]:
    """The `k` best (start, end, score) token spans with ``start <= end < start + max_answer_len``; ties go to the
    earlier start, then the earlier end. Scores only the band of allowed spans, not all n² pairs."""
    n, width = len(p_start), min(max_answer_len, len(p_start))
    ends = np.arange(n)[:, None] + np.arange(width)[None, :]  # [start, length - 1] → end
    valid = ends < n
    scores = np.where(valid, p_start[:, None] * p_end[np.minimum(ends, n - 1)], -1.0).ravel()
    best = np.argsort(-scores, kind="stable")[: min(k, int(valid.sum()))]
    return [(int(i) // width, int(i) // width + int(i) % width, float(scores[i])) for i in best]


def _char_span(context: str, window: QAWindow, s: int, e: int, align_to_words: bool) -> tuple[int, int]:
    if align_to_words:
        while s > 0 and not window.word_starts[s]:
            s -= 1
        while e + 1 < len(window.word_starts) and not window.word_starts[e + 1]:
            e += 1
    start, end = window.offsets[s][0], window.offsets[e][1]
    text = context[start:end]
    if not text.strip():  # a whitespace-only span stays as it is rather than becoming the empty "no answer"
        return start, end
    return start + len(text) - len(text.lstrip()), end - (len(text) - len(text.rstrip()))


class QAService:
    def __init__(self, tokenizer, forward: Forward, *, max_length: int, limits: Limits | None = None):
        if tokenizer.bos_token_id is None:
            raise ValueError("the QA layout needs the tokenizer's bos token")
        self.tokenizer = tokenizer
        self.forward = forward
        self.max_length = max_length  # the model's context
        self.limits = limits or Limits()

    async def answer(self, request: QARequest | dict) -> QAResponse:
        request = parse(QARequest, request)
        self.limits.check_chars("context", len(request.question) + len(request.context))
        windows = preprocess(request, self.tokenizer, self.max_length, self.limits)
        start_logits, end_logits = await run_forward(self.forward, [w.ids for w in windows])
        return QAResponse(answers=postprocess(start_logits, end_logits, windows, request),
                          usage=Usage(prompt_tokens=sum(len(w.ids) for w in windows)))
