"""Extractive question answering with the contract of HF's ``QuestionAnsweringPipeline`` (transformers removed it
in 5.3; this is the reference now): ``[{score, start, end, answer}]`` with character offsets into the context,
``answer == context[start:end]``. By default the answers are those of transformers 4.56.2's pipeline, spans and
scores (``tests/test_qa_reference.py`` checks it on cases the pipeline itself answered).

Input: the tokenizer's pair encoding of question and context, ``<seed:bos> question <seed:bos> context`` for
SeedOss, cut like the pipeline's ``tokenizer(question, context, truncation="only_second", max_length=max_seq_len,
stride=doc_stride, return_overflowing_tokens=True)``: a context that does not fit ``max_seq_len`` (default
``min(384, model context)``) is split into windows repeating ``doc_stride`` tokens (default
``min(128, max_seq_len // 2)``) of the previous one.

Decoding, per window, as the pipeline's ``select_starts_ends`` and ``decode_spans`` do:
- only context tokens can start or end an answer, plus the CLS token where the tokenizer has one (SeedOss has
  none: its ``<seed:bos>`` is masked like every special token); the other logits become -10000 before the start
  and end softmaxes;
- with ``handle_impossible_answer`` the no-answer score is the smallest ``p_start[0] * p_end[0]`` over the
  windows, taken before position 0 is zeroed. Without a CLS token that is 0.0: the "" answer only fills up a list
  with fewer than ``top_k`` answers;
- a span scores ``p_start * p_end``, ends at or after its start and is at most ``max_answer_len`` tokens; a window
  offers its best ``top_k`` spans, or ``2 * top_k + 10`` with ``align_to_words`` (several grow into the same words);
- with ``align_to_words`` a span grows to whole words as the tokenizer's word ids (its pre-tokenizer's pieces) see
  them within the window, so a byte-level answer usually starts with the space before its word (``" Paris"``);
- answers with the same text, compared case-insensitively, are one answer whose scores add up (the first one's
  offsets stay); the ``top_k`` best are returned.

One difference: when a window has fewer allowed spans than it offers (a context of a few tokens with a large
``top_k``), the pipeline fills up with zero-score pseudo-spans (reversed, or ending in the question) picked by
``np.argpartition``'s tie order; we offer the real spans only.

Opt-in, off by default: ``strip_whitespace`` trims the whitespace around each span before answers are merged, so
``" Paris"`` and ``"Paris"`` become one answer ``"Paris"``.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, Field

from .errors import InvalidRequest
from .limits import Limits
from .schemas import Forward, ServiceModel, Text, Usage, as_numpy, off_loop, parse, run_forward, text_size

DEFAULT_MAX_SEQ_LEN = 384
DEFAULT_DOC_STRIDE = 128
MASKED_LOGIT = -10000.0  # what the pipeline puts in place of the logits of tokens that cannot be in an answer


class QARequest(ServiceModel):
    question: Text
    context: Text
    top_k: int = Field(1, ge=1)
    max_answer_len: int = Field(15, ge=1, description="tokens")
    max_seq_len: int | None = Field(None, ge=4, description="tokens per window, question included")
    doc_stride: int | None = Field(None, ge=0, description="context tokens shared by consecutive windows")
    handle_impossible_answer: bool = False
    align_to_words: bool = True
    strip_whitespace: bool = Field(False, description="trim whitespace around answers (the pipeline does not)")


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
    ids: list[int]  # the window's pair encoding
    allowed: np.ndarray  # bool per token: may start or end an answer (context tokens, and a CLS token)
    token_chars: list[tuple[int, int]]  # per token: its character span in the context ((0, 0) outside it)
    word_chars: list[tuple[int, int]]  # per token: the character span of its word within this window


def preprocess(request: QARequest, tokenizer, max_length: int, limits: Limits | None = None) -> list[QAWindow]:
    """The windows of the pair (question, context); `limits` bounds their total tokens before any is built."""
    max_seq_len = request.max_seq_len or min(DEFAULT_MAX_SEQ_LEN, max_length, tokenizer.model_max_length or max_length)
    if max_seq_len > max_length:
        raise InvalidRequest(f"max_seq_len must not exceed the model's context ({max_length})", param="max_seq_len")
    # `tokenizers` refuses a stride above max_seq_len less the special tokens of a single text, windows or not.
    stride_limit = max_seq_len - tokenizer.num_special_tokens_to_add(pair=False)
    if request.doc_stride is not None and request.doc_stride > stride_limit:
        raise InvalidRequest(f"doc_stride must not exceed {stride_limit} with max_seq_len {max_seq_len}",
                             param="doc_stride")
    question = len(tokenizer.encode(request.question, add_special_tokens=False))
    context = len(tokenizer.encode(request.context, add_special_tokens=False))
    room = max_seq_len - question - tokenizer.num_special_tokens_to_add(pair=True)  # context tokens per window
    stride = request.doc_stride
    if stride is None:
        # The pipeline's default, lowered for a long question where the pipeline's tokenizer would fail.
        stride = max(0, min(DEFAULT_DOC_STRIDE, max_seq_len // 2, room - 1))
    if context > room:  # windows needed: check what `tokenizers` would refuse
        if room < 1:
            raise InvalidRequest(f"the question takes {question} tokens, leaving no room for context within "
                                 f"max_seq_len {max_seq_len}", param="question")
        if stride >= room:
            raise InvalidRequest(f"doc_stride must be below the {room} context tokens a window holds with this "
                                 "question", param="doc_stride")
    if limits is not None:
        limits.check_task_tokens("context" if request.doc_stride is None else "doc_stride",
                                 window_tokens(context, room, stride, max_seq_len))
    return [_window(encoding, tokenizer.cls_token_id)
            for encoding in tokenizer.encode_pair_windows(request.question, request.context, max_seq_len, stride)]


def window_tokens(context: int, room: int, stride: int, max_seq_len: int) -> int:
    """Tokens of all the windows `tokenizers` makes of a pair whose context has `context` tokens, `room` of them per
    window (each window also holds the question and the special tokens: ``max_seq_len - room``), consecutive windows
    sharing `stride` (the last one shorter): computed without making them."""
    count = 1 if context <= room else 1 + -(-(context - room) // (room - stride))
    return count * (max_seq_len - room) + context + (count - 1) * stride


def _window(encoding, cls_token_id: int | None) -> QAWindow:
    """A `tokenizers` encoding of (question, context) → what decoding needs, computed the way the pipeline reads it
    (``sequence_ids`` for its p_mask, ``offsets``, ``token_to_word`` + ``word_to_chars(word, sequence_index=1)``)."""
    in_context = [sequence == 1 for sequence in encoding.sequence_ids]
    allowed = np.array(in_context) | (np.array(encoding.ids) == cls_token_id)
    offsets = [tuple(o) if inside else (0, 0) for o, inside in zip(encoding.offsets, in_context)]
    first, last = {}, {}  # word id → first and last context token of that word in this window
    for i, (word, inside) in enumerate(zip(encoding.word_ids, in_context)):
        if inside and word is not None:
            first.setdefault(word, i)
            last[word] = i
    words = [(offsets[first[w]][0], offsets[last[w]][1]) if inside and w is not None else offsets[i]
             for i, (w, inside) in enumerate(zip(encoding.word_ids, in_context))]
    return QAWindow(list(encoding.ids), allowed, offsets, words)


def postprocess(start_logits, end_logits, windows: list[QAWindow], request: QARequest) -> list[Answer]:
    """Start and end logits [tokens of all windows packed] → the best answers."""
    start_logits, end_logits = as_numpy(start_logits), as_numpy(end_logits)
    offered = request.top_k * 2 + 10 if request.align_to_words else request.top_k
    answers: dict[str, Answer] = {}  # by lowercased text, in the order first seen
    null_score = 1_000_000.0  # the pipeline's "large and positive" start
    at = 0
    for window in windows:
        n = len(window.ids)
        p_start = _masked_softmax(start_logits[at: at + n], window.allowed)
        p_end = _masked_softmax(end_logits[at: at + n], window.allowed)
        at += n
        null_score = min(null_score, float(p_start[0] * p_end[0]))
        p_start[0] = p_end[0] = 0.0  # position 0 (CLS) is the no-answer, never a span
        for s, e, score in _best_spans(p_start, p_end, window.allowed, offered, request.max_answer_len):
            chars = window.word_chars if request.align_to_words else window.token_chars
            start, end = chars[s][0], chars[e][1]
            if request.strip_whitespace:
                start, end = _strip(request.context, start, end)
            text = request.context[start:end]
            if text.lower() in answers:
                answers[text.lower()].score += score
            else:
                answers[text.lower()] = Answer(score=score, start=start, end=end, answer=text)
    candidates = list(answers.values())
    if request.handle_impossible_answer:
        candidates.append(Answer(score=null_score, start=0, end=0, answer=""))
    return sorted(candidates, key=lambda a: a.score, reverse=True)[: request.top_k]  # stable, as the pipeline's


def _masked_softmax(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """The pipeline's float32 softmax over the window with disallowed logits set to -10000."""
    x = np.where(allowed, logits, np.float32(MASKED_LOGIT))
    x = np.exp(x - x.max())
    return x / x.sum()


def _best_spans(p_start: np.ndarray, p_end: np.ndarray, allowed: np.ndarray, k: int, max_answer_len: int
                ) -> list[tuple[int, int, float]]:
    """The `k` best (start, end, score) token spans with ``start <= end < start + max_answer_len``, both ends
    allowed, score > 0; ties go to the earlier start, then the earlier end (as the pipeline's ``np.argmax`` for
    ``top_k`` 1; for more, its order of exact ties is ``np.argpartition``'s).
    Scores the band of allowed spans rather than the pipeline's full n × n outer product."""
    n, width = len(p_start), min(max_answer_len, len(p_start))
    ends = np.arange(n)[:, None] + np.arange(width)[None, :]  # [start, length - 1] → end
    valid = (ends < n) & allowed[:, None] & allowed[np.minimum(ends, n - 1)]
    scores = np.where(valid, p_start[:, None] * p_end[np.minimum(ends, n - 1)], np.float32(0)).ravel()
    best = np.argsort(-scores, kind="stable")[: k]
    return [(int(i) // width, int(i) // width + int(i) % width, float(scores[i])) for i in best if scores[i] > 0]


def _strip(context: str, start: int, end: int) -> tuple[int, int]:
    """`start`, `end` moved inwards past whitespace; a whitespace-only span stays as it is rather than becoming
    the empty "no answer"."""
    text = context[start:end]
    if not text.strip():
        return start, end
    return start + len(text) - len(text.lstrip()), end - (len(text) - len(text.rstrip()))


class QAService:
    def __init__(self, tokenizer, forward: Forward, *, max_length: int, limits: Limits | None = None,
                 executor: Executor | None = None):
        self.tokenizer = tokenizer
        # where the windows are tokenized (`off_loop`); one thread at most: `encode_pair_windows` sets the
        # tokenizer's truncation for its call, so two windowings must not overlap
        self.executor = executor
        self.forward = forward
        self.max_length = max_length  # the model's context
        self.limits = limits or Limits()

    async def answer(self, request: QARequest | dict) -> QAResponse:
        request = parse(QARequest, request)
        self.limits.check_chars("context", len(request.question) + len(request.context))
        size = text_size(request.question, request.context)
        windows = await off_loop(self.executor, preprocess, request, self.tokenizer, self.max_length, self.limits,
                                 size=size)
        start_logits, end_logits = await run_forward(self.forward, [w.ids for w in windows])
        answers = await off_loop(self.executor, postprocess, start_logits, end_logits, windows, request, size=size)
        return QAResponse(answers=answers,
                          usage=Usage(prompt_tokens=sum(len(w.ids) for w in windows)))
