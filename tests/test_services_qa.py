"""Question answering service on the demo checkpoint's QA head: layout, span decoding, windows, impossible answers."""

from __future__ import annotations

import asyncio
import copy
import random

import numpy as np
import pytest
import torch

from seedoss.demo import head_dir
from seedoss.loader import load_head, load_stage
from seedoss.model import StepBatch
from seedoss.tokenizer import SeedOssTokenizer
from seedoss.services.errors import InvalidRequest
from seedoss.services.qa import Answer, QARequest, QAService, preprocess
from seedoss.services.schemas import local_forward

WORDS = ["the", "river", "Paris", "city", "was", "founded", "in", "1066", "by", "Normans", "café", "Zürich",
         "東京", "タワー", "🎉", "naïve", "Ångström", "bridge", "north", "of", "and", "its", "mayor", "Müller", ","]
CONTEXT = ("The Eiffel Tower, in Paris, was finished in 1889. Gustave Eiffel's company built it; "
           "visitors from Zürich, 東京 and São Paulo climb its 1,665 steps 🎉 every day.")
LONG_CONTEXT = " ".join([CONTEXT, "Later, radio antennas were added to the top.", CONTEXT.upper()])


@pytest.fixture(scope="module")
def qa_dir(demo_checkpoint):
    return head_dir(demo_checkpoint, "qa")


@pytest.fixture(scope="module")
def tokenizer(qa_dir):
    return SeedOssTokenizer.from_pretrained(qa_dir)


@pytest.fixture(scope="module")
def model(demo_checkpoint, qa_dir):
    return load_stage(demo_checkpoint), load_head(qa_dir, "qa")


@pytest.fixture(scope="module")
def forward(model):
    return local_forward(*model)


def recording(forward, tweak=None):
    """`forward` that records (sequences, start, end) of each call, after `tweak(sequences, start, end)`."""
    calls = []

    async def run(sequences):
        start, end = await forward(sequences)
        if tweak:
            start, end = tweak(sequences, start.clone(), end.clone())
        calls.append((sequences, start.numpy(), end.numpy()))
        return start, end

    return run, calls


def answer(tokenizer, forward, request, max_length=4096):
    return asyncio.run(QAService(tokenizer, forward, max_length=max_length).answer(request))


def random_pair(rng):
    return (" ".join(rng.choices(WORDS, k=rng.randint(1, 8))) + "?",
            " ".join(rng.choices(WORDS, k=rng.randint(1, 60))))


def test_layout_is_the_tokenizers_pair_encoding(tokenizer, qa_dir):
    """The pipeline's input and p_mask: only context tokens may be in an answer; <seed:bos> is no CLS token."""
    from transformers import AutoTokenizer

    request = QARequest(question="Where is the tower?", context=CONTEXT)
    (window,) = preprocess(request, tokenizer, 4096)
    hf = AutoTokenizer.from_pretrained(qa_dir)(request.question, request.context, return_offsets_mapping=True)
    assert window.ids == hf["input_ids"] and hf.sequence_ids()[0] is None
    assert window.allowed.tolist() == [sequence == 1 for sequence in hf.sequence_ids()]
    assert [chars for chars, allowed in zip(window.token_chars, window.allowed) if allowed] == \
        [tuple(o) for o, sequence in zip(hf["offset_mapping"], hf.sequence_ids()) if sequence == 1]


def test_answers_come_from_the_context_only(tokenizer, forward):
    """Whatever the head says about the question and the separator, answers are the same context spans."""

    def promote_question(sequences, start, end):
        at = 0
        for seq in sequences:
            context_start = seq.index(tokenizer.bos_token_id, 1) + 1
            start[at + 1: at + context_start] += 50.0
            end[at + 1: at + context_start] += 50.0
            at += len(seq)
        return start, end

    rng = random.Random(0)
    for _ in range(25):
        question, context = random_pair(rng)
        request = {"question": question, "context": context, "top_k": 3, "align_to_words": rng.random() < 0.5,
                   "strip_whitespace": rng.random() < 0.5}
        plain = answer(tokenizer, forward, request)
        adversarial = answer(tokenizer, recording(forward, promote_question)[0], request)
        assert adversarial.answers == plain.answers
        for a in plain.answers:
            assert 0 <= a.start < a.end <= len(context) and a.answer == context[a.start: a.end]
            assert a.answer == a.answer.strip() or not request["strip_whitespace"]


def test_non_ascii_offsets(tokenizer, forward):
    """Answers are whole tokens, or with align_to_words whole words of the tokenizer's pre-tokenizer (its word ids:
    punctuation is a word of its own), multi-byte characters included."""
    (encoding,) = tokenizer.encode_pair_windows("Who climbs?", CONTEXT, 4096, 0)
    context = [i for i, sequence in enumerate(encoding.sequence_ids) if sequence == 1]
    token_starts, token_ends = {encoding.offsets[i][0] for i in context}, {encoding.offsets[i][1] for i in context}
    word_starts = {encoding.offsets[i][0] for i in context if encoding.word_ids[i] != encoding.word_ids[i - 1]}
    word_ends = {encoding.offsets[i][1] for i in context
                 if i + 1 == len(encoding.ids) or encoding.word_ids[i] != encoding.word_ids[i + 1]}
    assert token_starts > word_starts and token_ends > word_ends
    seen = set()
    for align in (True, False):
        result = answer(tokenizer, forward, {"question": "Who climbs?", "context": CONTEXT, "top_k": 60,
                                             "max_answer_len": 3, "align_to_words": align})
        assert len(result.answers) > 20
        for a in result.answers:
            assert a.answer == CONTEXT[a.start: a.end]
            assert (a.start, a.end) in ({(s, e) for s in word_starts for e in word_ends} if align else
                                        {(s, e) for s in token_starts for e in token_ends})
            seen.update(a.answer)
    assert set("東京ãü🎉") & seen  # multi-byte characters did come back, whole


def test_top_k_sorted_and_distinct(tokenizer, forward):
    for top_k in (1, 5, 40):
        result = answer(tokenizer, forward, {"question": "When was it finished?", "context": CONTEXT, "top_k": top_k})
        scores = [a.score for a in result.answers]
        assert 1 <= len(scores) <= top_k and scores == sorted(scores, reverse=True)
        assert len({a.answer.lower() for a in result.answers}) == len(scores)
        assert all(0 < s <= 1 for s in scores)
    assert len(scores) > 20


def test_max_answer_len(tokenizer, forward):
    _, offsets = tokenizer.encode_with_offsets(CONTEXT, add_special_tokens=False)

    def spans(n_tokens):  # character spans of n consecutive tokens
        for i in range(len(offsets) - n_tokens + 1):
            yield offsets[i][0], offsets[i + n_tokens - 1][1]

    for max_answer_len in (1, 2, 4):
        result = answer(tokenizer, forward, {"question": "What?", "context": CONTEXT, "top_k": 20,
                                             "max_answer_len": max_answer_len, "align_to_words": False})
        allowed = {span for n in range(1, max_answer_len + 1) for span in spans(n)}
        assert len(result.answers) > 10
        assert all((a.start, a.end) in allowed for a in result.answers)
        longer = {span for span in spans(max_answer_len + 1)} - allowed
        assert not longer & {(a.start, a.end) for a in result.answers}


def test_long_context_windows_match_brute_force(tokenizer, forward, qa_dir):
    """Windows as transformers' tokenizer cuts them; per window a softmax over the context tokens alone, every
    allowed span scored, the best top_k kept; same texts merged (case-insensitively) over the windows."""
    from transformers import AutoTokenizer

    question, max_seq_len, doc_stride = "Who built the tower?", 32, 8
    run, calls = recording(forward)
    request = {"question": question, "context": LONG_CONTEXT, "max_seq_len": max_seq_len, "doc_stride": doc_stride,
               "align_to_words": False, "handle_impossible_answer": True, "top_k": 2}
    result = answer(tokenizer, run, request)
    ((sequences, start, end),) = calls
    hf = AutoTokenizer.from_pretrained(qa_dir)(question, LONG_CONTEXT, truncation="only_second", max_length=max_seq_len,
                                               stride=doc_stride, return_overflowing_tokens=True,
                                               return_offsets_mapping=True)
    assert sequences == hf["input_ids"] and len(sequences) > 3

    found, at = {}, 0  # lowercased answer → [summed score, start, end]
    for w, seq in enumerate(sequences):
        context = [at + j for j, sid in enumerate(hf.sequence_ids(w)) if sid == 1]  # positions of context tokens
        p_start = np.exp(start[context]) / np.exp(start[context]).sum()
        p_end = np.exp(end[context]) / np.exp(end[context]).sum()
        spans = [(p_start[i] * p_end[j], i, j) for i in range(len(context))
                 for j in range(i, min(i + 15, len(context)))]
        for score, i, j in sorted(spans, key=lambda x: (-x[0], x[1], x[2]))[:2]:
            s, e = hf["offset_mapping"][w][context[i] - at][0], hf["offset_mapping"][w][context[j] - at][1]
            found.setdefault(LONG_CONTEXT[s:e].lower(), [0.0, s, e])[0] += score
        at += len(seq)
    # Without a CLS token the no-answer scores 0: it only fills up a short list.
    expected = sorted([(score, s, e) for score, s, e in found.values()] + [(0.0, 0, 0)], key=lambda x: -x[0])[:2]
    assert [(a.start, a.end) for a in result.answers] == [(s, e) for _, s, e in expected]
    np.testing.assert_allclose([a.score for a in result.answers], [score for score, _, _ in expected], rtol=1e-5)


def test_impossible_answer(tokenizer, forward):
    """<seed:bos> is no CLS token: the pipeline masks it, so the no-answer scores 0.0 whatever the head says there.
    With a CLS token, position 0 joins the softmaxes and the no-answer scores the smallest p_start * p_end there."""

    def promote_first_position(sequences, start, end):
        at = 0
        for seq in sequences:
            start[at] += 40.0
            end[at] += 40.0
            at += len(seq)
        return start, end

    request = {"question": "Who?", "context": LONG_CONTEXT, "max_seq_len": 40, "doc_stride": 10,
               "handle_impossible_answer": True, "top_k": 3}
    boosted, _ = recording(forward, promote_first_position)
    assert answer(tokenizer, boosted, request) == answer(tokenizer, forward, request)
    assert all(a.answer for a in answer(tokenizer, forward, request).answers)
    ranked = answer(tokenizer, forward, {**request, "top_k": 10_000}).answers  # every candidate
    assert len(ranked) > 100 and ranked[-1] == Answer(score=0.0, start=0, end=0, answer="")
    assert all(a.answer and a.score > 0 for a in ranked[:-1])
    assert [a.score for a in ranked] == sorted((a.score for a in ranked), reverse=True)
    assert all(a.answer for a in answer(tokenizer, forward, {**request, "handle_impossible_answer": False,
                                                            "top_k": 10_000}).answers)

    with_cls = copy.copy(tokenizer)
    with_cls.cls_token_id = tokenizer.bos_token_id  # as the pipeline, every token with the CLS id stays allowed
    run, calls = recording(forward, promote_first_position)
    result = answer(with_cls, run, request)
    assert result.answers[0].model_dump(exclude={"score"}) == {"start": 0, "end": 0, "answer": ""}
    ((sequences, start, end),) = calls
    null, at = 1.0, 0  # the smallest no-answer probability over the windows
    for seq in sequences:
        allowed = [at + i for i, token in enumerate(seq) if token == tokenizer.bos_token_id]
        allowed += range(at + seq.index(tokenizer.bos_token_id, 1) + 1, at + len(seq))
        null = min(null, (np.exp(start[allowed]) / np.exp(start[allowed]).sum())[0]
                   * (np.exp(end[allowed]) / np.exp(end[allowed]).sum())[0])
        at += len(seq)
    assert result.answers[0].score == pytest.approx(null, rel=1e-5)


def test_strip_whitespace_is_opt_in(tokenizer, forward):
    """Byte-level words carry the space before them, so the pipeline's answers do; strip_whitespace trims them and
    merges the answers that become equal."""
    request = {"question": "Who?", "context": LONG_CONTEXT, "top_k": 10_000}  # every span: the same candidates
    plain = answer(tokenizer, forward, request).answers
    stripped = answer(tokenizer, forward, {**request, "strip_whitespace": True}).answers
    assert any(a.answer != a.answer.strip() for a in plain)
    assert all(a.answer == LONG_CONTEXT[a.start: a.end] for a in stripped)
    assert all(a.answer == a.answer.strip() or not a.answer.strip() for a in stripped)  # whitespace alone stays
    merged = {}
    for a in plain:
        text = (a.answer.strip() or a.answer).lower()
        merged[text] = merged.get(text, 0.0) + a.score
    assert len(stripped) == len(merged) < len(plain)
    assert {a.answer.lower(): pytest.approx(a.score, rel=1e-5) for a in stripped} == merged


def test_short_context_offers_real_spans_only(tokenizer, forward):
    """Fewer allowed spans than a window offers: the pipeline would pad with zero-score pseudo-spans; we don't."""
    result = answer(tokenizer, forward, {"question": "Who?", "context": "Paris", "top_k": 50,
                                         "handle_impossible_answer": True})
    (encoding,) = tokenizer.encode_pair_windows("Who?", "Paris", 384, 0)
    n = encoding.sequence_ids.count(1)
    assert n > 1 and all(a.score > 0 for a in result.answers[:-1]) and result.answers[-1].answer == ""
    assert len({(a.start, a.end) for a in result.answers[:-1]}) == len(result.answers) - 1 <= n * (n + 1) // 2
    assert all(0 <= a.start < a.end <= 5 for a in result.answers[:-1])


def test_default_window_and_stride(tokenizer, forward):
    """max_seq_len defaults to min(384, context); doc_stride to min(128, max_seq_len // 2), fitted to the question."""
    long = " ".join([LONG_CONTEXT] * 4)
    request = QARequest(question="Who?", context=long)
    n = len(tokenizer.encode(long, add_special_tokens=False))
    budget = 384 - 2 - len(tokenizer.encode("Who?", add_special_tokens=False))  # context tokens per window
    windows = preprocess(request, tokenizer, 4096)
    assert n > budget and len(windows) == 1 + -(-(n - budget) // (budget - 128))
    assert max(len(w.ids) for w in windows) == 384
    assert max(len(w.ids) for w in preprocess(request, tokenizer, 100)) == 100
    long_question = QARequest(question=" ".join(["why"] * 20), context=long, max_seq_len=30)
    assert len(preprocess(long_question, tokenizer, 4096)) > 1  # stride lowered below the context budget


def test_windows_are_transformers_overflowing_tokens(tokenizer, qa_dir):
    """Random lengths, windows and strides: the pipeline's tokenizer call gives the same windows, or fails (an
    error or a panic in `tokenizers`) where we answer an InvalidRequest naming the field."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(qa_dir)
    rng = random.Random(1)
    outcomes = set()
    for _ in range(300):
        question, context = random_pair(rng)
        max_seq_len = rng.randint(4, 48)
        stride = rng.choice([0, 1, max_seq_len - 2, max_seq_len - 1, max_seq_len, rng.randint(0, 50)])
        try:
            reference = hf(question, context, truncation="only_second", max_length=max_seq_len, stride=stride,
                           return_overflowing_tokens=True)
        except BaseException as exc:  # noqa: BLE001 - a Rust panic is a BaseException
            if isinstance(exc, KeyboardInterrupt):
                raise
            reference = None
        request = QARequest(question=question, context=context, max_seq_len=max_seq_len, doc_stride=stride)
        if reference is None:
            with pytest.raises(InvalidRequest) as err:
                preprocess(request, tokenizer, 4096)
            assert err.value.param in ("question", "doc_stride")
            outcomes.add(err.value.param)
            continue
        windows = preprocess(request, tokenizer, 4096)
        assert [w.ids for w in windows] == reference["input_ids"]
        assert [w.allowed.tolist() for w in windows] == \
            [[sid == 1 for sid in reference.sequence_ids(i)] for i in range(len(windows))]
        outcomes.add(len(windows) > 1)
    assert outcomes == {"question", "doc_stride", True, False}


@pytest.mark.parametrize("request_, param", [
    ({"context": CONTEXT}, "question"),
    ({"question": "", "context": CONTEXT}, "question"),
    ({"question": "Who?", "context": ""}, "context"),
    ({"question": ["Who?"], "context": CONTEXT}, "question"),
    ({"question": "Who?", "context": CONTEXT, "top_k": 0}, "top_k"),
    ({"question": "Who?", "context": CONTEXT, "top_k": 1.5}, "top_k"),
    ({"question": "Who?", "context": CONTEXT, "max_answer_len": 0}, "max_answer_len"),
    ({"question": "Who?", "context": CONTEXT, "max_seq_len": 64, "doc_stride": 64}, "doc_stride"),
    ({"question": "q", "context": "c", "max_seq_len": 16, "doc_stride": 16}, "doc_stride"),  # fits, still refused
    ({"question": "Who?", "context": CONTEXT, "max_seq_len": 16, "doc_stride": 13}, "doc_stride"),  # < 13 fit
    ({"question": "Who?", "context": CONTEXT, "doc_stride": -1}, "doc_stride"),
    ({"question": "Who?", "context": CONTEXT, "max_seq_len": 5000}, "max_seq_len"),
    ({"question": " ".join(["why"] * 40), "context": CONTEXT, "max_seq_len": 32}, "question"),
    ({"question": "Who?", "context": CONTEXT, "handle_impossible_answer": "no"}, "handle_impossible_answer"),
    ({"question": "Who?", "context": CONTEXT, "topk": 2}, "topk"),
])
def test_bad_requests_name_the_field(tokenizer, forward, request_, param):
    with pytest.raises(InvalidRequest) as err:
        answer(tokenizer, forward, request_)
    assert err.value.param == param


def test_forward_may_be_synchronous(tokenizer, model, forward):
    stage, head = model

    def sync(sequences):
        batch = StepBatch(list(range(len(sequences))), [len(s) for s in sequences], [0] * len(sequences))
        with torch.no_grad():
            return head(stage(torch.tensor(sum(sequences, [])), batch))

    request = {"question": "Who?", "context": LONG_CONTEXT, "max_seq_len": 40, "top_k": 3}
    assert answer(tokenizer, sync, request) == answer(tokenizer, forward, request)
