"""Sequence classification service on the demo checkpoint's classify head, vs transformers' text-classification
pipeline."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from seedoss.config import SeedOssConfig
from seedoss.demo import head_dir
from seedoss.loader import load_head, load_stage
from seedoss.tokenizer import SeedOssTokenizer
from seedoss.services.classification import ClassificationService
from seedoss.services.errors import InvalidRequest
from seedoss.services.schemas import local_forward

TEXTS = ["I loved this film.", "Terrible service — never again!", "Ça va, 東京 est loin 🚄", "ok"]


@pytest.fixture(scope="module")
def classify_dir(demo_checkpoint):
    return head_dir(demo_checkpoint, "classify")


@pytest.fixture(scope="module")
def service_factory(demo_checkpoint, classify_dir):
    tokenizer = SeedOssTokenizer.from_pretrained(classify_dir)
    forward = local_forward(load_stage(demo_checkpoint), load_head(classify_dir, "classify"))
    labels = SeedOssConfig.from_pretrained(classify_dir).labels
    return lambda max_length=4096: ClassificationService(tokenizer, labels, forward, max_length=max_length)


@pytest.fixture(scope="module")
def hf_pipeline(classify_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    model = AutoModelForSequenceClassification.from_pretrained(classify_dir).eval()
    return pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(classify_dir))


def classify(service, request):
    return asyncio.run(service.classify(request))


@pytest.mark.parametrize("function", [None, "softmax", "sigmoid", "none"])
def test_parity_with_hf_pipeline(service_factory, hf_pipeline, function):
    request = {"inputs": TEXTS}
    if function:
        request["function_to_apply"] = function
    ours = classify(service_factory(), request)
    theirs = hf_pipeline(TEXTS, top_k=None, function_to_apply=function)
    for mine, hf in zip(ours.results, theirs):
        assert [p.label for p in mine.predictions] == [h["label"] for h in hf]
        np.testing.assert_allclose([p.score for p in mine.predictions], [h["score"] for h in hf], atol=1e-5)


def test_defaults_are_teis(service_factory):
    """All labels, best first, softmax; raw_scores gives logits; probs only on request."""
    service = service_factory()
    result = classify(service, {"inputs": TEXTS[0]}).results[0]
    assert len(result.predictions) == 3 and result.probs is None
    scores = [p.score for p in result.predictions]
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0)
    raw = classify(service, {"inputs": TEXTS[0], "raw_scores": True}).results[0]
    logits = {p.label: p.score for p in raw.predictions}
    softmax = np.exp(list(logits.values())) / np.exp(list(logits.values())).sum()
    assert dict(zip(logits, softmax)) == pytest.approx({p.label: p.score for p in result.predictions})


def test_top_k_and_full_probabilities(service_factory):
    service = service_factory()
    full = classify(service, {"inputs": TEXTS, "full_probabilities": True})
    top1 = classify(service, {"inputs": TEXTS, "top_k": 1, "return_all_scores": True})
    assert full.usage.prompt_tokens == sum(len(service.tokenizer.encode(t)) for t in TEXTS)
    for a, b in zip(full.results, top1.results):
        assert b.predictions == a.predictions[:1]
        assert a.probs == b.probs and len(a.probs) == 3
        best = int(np.argmax(a.probs))
        assert a.predictions[0].label == service.labels[best] and a.predictions[0].score == a.probs[best]


def test_batch_equals_single(service_factory):
    service = service_factory()
    batch = classify(service, {"inputs": TEXTS}).results
    for text, result in zip(TEXTS, batch):
        single = classify(service, {"inputs": text}).results[0]
        assert [p.label for p in single.predictions] == [p.label for p in result.predictions]
        np.testing.assert_allclose([p.score for p in single.predictions], [p.score for p in result.predictions],
                                   atol=1e-5)


def test_too_long_input_needs_truncate(service_factory):
    text = "one two three four five six seven eight nine ten"
    service = service_factory(max_length=6)
    with pytest.raises(InvalidRequest) as err:
        classify(service, {"inputs": ["ok", text]})
    assert err.value.param == "inputs" and "inputs.1" in err.value.message
    assert err.value.code == "context_length_exceeded"
    truncated = classify(service, {"inputs": text, "truncate": True})
    assert truncated.usage.prompt_tokens == 6
    prefix = service.tokenizer.encode(text)[:6]  # the first tokens, <seed:bos> included
    expected = classify(service_factory(), {"inputs": service.tokenizer.decode(prefix)})
    assert truncated.results[0].predictions[0].label == expected.results[0].predictions[0].label


@pytest.mark.parametrize("request_, param", [
    ({}, "inputs"),
    ({"inputs": []}, "inputs"),
    ({"inputs": ""}, "inputs.0"),
    ({"inputs": ["ok", ""]}, "inputs.1"),
    ({"inputs": None}, "inputs"),
    ({"inputs": [3]}, "inputs.0"),
    ({"inputs": "ok", "top_k": 0}, "top_k"),
    ({"inputs": "ok", "top_k": "2"}, "top_k"),
    ({"inputs": "ok", "function_to_apply": "relu"}, "function_to_apply"),
    ({"inputs": "ok", "function_to_apply": "softmax", "raw_scores": True}, "raw_scores"),
    ({"inputs": "ok", "truncate": 1}, "truncate"),
    ({"inputs": "ok", "topk": 1}, "topk"),
])
def test_bad_requests_name_the_field(service_factory, request_, param):
    with pytest.raises(InvalidRequest) as err:
        classify(service_factory(), request_)
    assert err.value.param == param
    assert err.value.to_openai_body()["error"]["param"] == param


def test_text_pairs_match_hf_pair_encoding(service_factory, classify_dir):
    """`text_pairs` scores each pair as HF's model does on `tokenizer(text, text_pair)` (a cross-encoder's input)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(classify_dir).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(classify_dir)
    queries, docs = ["weather today", "weather today"], ["sunny and warm", "a recipe for bread"]
    out = classify(service_factory(), {"inputs": queries, "text_pairs": docs, "function_to_apply": "none",
                                       "full_probabilities": True})
    for q, d, result in zip(queries, docs, out.results):
        with torch.no_grad():
            logits = model(**hf_tokenizer(q, d, return_tensors="pt")).logits[0]
        np.testing.assert_allclose(result.probs, logits.numpy(), atol=1e-4)
    with pytest.raises(InvalidRequest, match="text_pairs"):
        classify(service_factory(), {"inputs": queries, "text_pairs": docs[:1]})

