"""Question answering service on the demo checkpoint's QA head: layout, span decoding, windows, impossible answers."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
import torch

from seedoss.demo import head_dir
from seedoss.loader import load_head, load_stage
from seedoss.model import StepBatch
from seedoss.tokenizer import SeedOssTokenizer
from services.errors import InvalidRequest
from services.qa import QARequest, QAService, preprocess
from services.schemas import local_forward

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
    from transformers import AutoTokenizer

    request = QARequest(question="Where is the tower?", context=CONTEXT)
    (window,) = preprocess(request, tokenizer, 4096)
    assert window.ids == AutoTokenizer.from_pretrained(qa_dir)(request.question, request.context)["input_ids"]
    assert window.ids[0] == window.ids[window.context_start - 1] == tokenizer.bos_token_id


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
        request = {"question": question, "context": context, "top_k": 3, "align_to_words": rng.random() < 0.5}
        plain = answer(tokenizer, forward, request)
        adversarial = answer(tokenizer, recording(forward, promote_question)[0], request)
        assert adversarial.answers == plain.answers
        for a in plain.answers:
            assert 0 <= a.start < a.end <= len(context) and a.answer == context[a.start: a.end]
            assert a.answer == a.answer.strip()


def test_non_ascii_offsets(tokenizer, forward):
    words = set(CONTEXT.split())
    seen = set()
    for align in (True, False):
        result = answer(tokenizer, forward, {"question": "Who climbs?", "context": CONTEXT, "top_k": 60,
                                             "max_answer_len": 3, "align_to_words": align})
        assert len(result.answers) > 20
        for a in result.answers:
            assert a.answer == CONTEXT[a.start: a.end] and a.answer.strip() == a.answer
            seen.update(a.answer)
            if align:  # whole whitespace-separated words
                assert a.answer.split()[0] in words and a.answer.split()[-1] in words
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

    def spans(n_tokens):  # character spans of n consecutive tokens, whitespace stripped
        for i in range(len(offsets) - n_tokens + 1):
            s, e = offsets[i][0], offsets[i + n_tokens - 1][1]
            text = CONTEXT[s:e]
            yield s + len(text) - len(text.lstrip()), e - len(text) + len(text.rstrip())

    for max_answer_len in (1, 2, 4):
        result = answer(tokenizer, forward, {"question": "What?", "context": CONTEXT, "top_k": 20,
                                             "max_answer_len": max_answer_len, "align_to_words": False})
        allowed = {span for n in range(1, max_answer_len + 1) for span in spans(n)}
        assert len(result.answers) > 10
        assert all((a.start, a.end) in allowed for a in result.answers)
        longer = {span for span in spans(max_answer_len + 1)} - allowed
        assert not longer & {(a.start, a.end) for a in result.answers}


def test_long_context_windows_match_brute_force(tokenizer, forward, qa_dir):
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

    found, null, at = {}, 1.0, 0  # lowercased answer → [summed score, start, end]
    for w, seq in enumerate(sequences):
        context = [j for j, sid in enumerate(hf.sequence_ids(w)) if sid == 1]  # positions of context tokens
        allowed = [at] + [at + j for j in context]
        p_start = np.exp(start[allowed]) / np.exp(start[allowed]).sum()
        p_end = np.exp(end[allowed]) / np.exp(end[allowed]).sum()
        null = min(null, p_start[0] * p_end[0])
        spans = [(p_start[1 + i] * p_end[1 + j], i, j) for i in range(len(context))
                 for j in range(i, min(i + 15, len(context)))]
        for score, i, j in sorted(spans, key=lambda x: (-x[0], x[1], x[2]))[:2]:
            s, e = hf["offset_mapping"][w][context[i]][0], hf["offset_mapping"][w][context[j]][1]
            text = LONG_CONTEXT[s:e]
            s, e = s + len(text) - len(text.lstrip()), e - len(text) + len(text.rstrip())
            found.setdefault(LONG_CONTEXT[s:e].lower(), [0.0, s, e])[0] += score
        at += len(seq)
    expected = sorted([(score, s, e) for score, s, e in found.values()] + [(null, 0, 0)], key=lambda x: -x[0])[:2]
    assert [(a.start, a.end) for a in result.answers] == [(s, e) for _, s, e in expected]
    np.testing.assert_allclose([a.score for a in result.answers], [score for score, _, _ in expected], rtol=1e-5)


def test_impossible_answer(tokenizer, forward):
    def promote_first_position(sequences, start, end):
        at = 0
        for seq in sequences:
            start[at] += 40.0
            end[at] += 40.0
            at += len(seq)
        return start, end

    request = {"question": "Who?", "context": LONG_CONTEXT, "max_seq_len": 40, "doc_stride": 10,
               "handle_impossible_answer": True, "top_k": 3}
    run, calls = recording(forward, promote_first_position)
    result = answer(tokenizer, run, request)
    assert result.answers[0].model_dump(exclude={"score"}) == {"start": 0, "end": 0, "answer": ""}
    assert [a.score for a in result.answers] == sorted((a.score for a in result.answers), reverse=True)
    ((sequences, start, end),) = calls
    null, at = 1.0, 0  # the smallest no-answer probability over the windows
    for seq in sequences:
        allowed = [at] + list(range(at + seq.index(tokenizer.bos_token_id, 1) + 1, at + len(seq)))
        null = min(null, (np.exp(start[allowed]) / np.exp(start[allowed]).sum())[0]
                   * (np.exp(end[allowed]) / np.exp(end[allowed]).sum())[0])
        at += len(seq)
    assert result.answers[0].score == pytest.approx(null, rel=1e-5)

    # Off by default, and without the boost the head's own no-answer score ranks among the spans.
    assert all(a.answer for a in answer(tokenizer, run, {**request, "handle_impossible_answer": False}).answers)
    ranked = answer(tokenizer, forward, {**request, "top_k": 10_000}).answers  # every candidate
    assert sum(a.answer == "" for a in ranked) == 1 and len(ranked) > 100
    assert [a.score for a in ranked] == sorted((a.score for a in ranked), reverse=True)


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


@pytest.mark.parametrize("request_, param", [
    ({"context": CONTEXT}, "question"),
    ({"question": "", "context": CONTEXT}, "question"),
    ({"question": "Who?", "context": ""}, "context"),
    ({"question": ["Who?"], "context": CONTEXT}, "question"),
    ({"question": "Who?", "context": CONTEXT, "top_k": 0}, "top_k"),
    ({"question": "Who?", "context": CONTEXT, "top_k": 1.5}, "top_k"),
    ({"question": "Who?", "context": CONTEXT, "max_answer_len": 0}, "max_answer_len"),
    ({"question": "Who?", "context": CONTEXT, "max_seq_len": 64, "doc_stride": 64}, "doc_stride"),
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
