"""Token classification service vs transformers' TokenClassificationPipeline on the demo checkpoint's tag head."""

from __future__ import annotations

import asyncio
import warnings

import pytest

from seedoss.config import SeedOssConfig
from seedoss.demo import head_dir
from seedoss.loader import load_head, load_stage
from seedoss.tokenizer import SeedOssTokenizer
from seedoss.services.errors import InvalidRequest
from seedoss.services.schemas import local_forward
from seedoss.services.tagging import TaggingRequest, TaggingService, preprocess

STRATEGIES = ["none", "simple", "first", "average", "max"]
TEXTS = [
    "John Smith lives in Paris and works for the United Nations.",
    "Café in Zürich — 東京タワー and 🎉 emoji",
    "Ångström, naïve façade; Müller's café\nnew line  two  spaces\ttab",
    "北京欢迎你！Ελληνικά κείμενο 😀👍🏽 done",
    "Hello <seed:bos> world<seed:eos> x",
]
LONG_TEXT = ("Maria Garcia flew from Madrid to New York, then met Dr. Chen at the World Bank. "
             "Später fuhr sie nach Köln — 東京 war zu weit.")
SMALL_CONTEXT = 24


@pytest.fixture(scope="module")
def tag_dir(demo_checkpoint):
    return head_dir(demo_checkpoint, "tag")


@pytest.fixture(scope="module")
def service_factory(demo_checkpoint, tag_dir):
    tokenizer = SeedOssTokenizer.from_pretrained(tag_dir)
    forward = local_forward(load_stage(demo_checkpoint), load_head(tag_dir, "tag"))
    labels = SeedOssConfig.from_pretrained(tag_dir).labels
    return lambda max_length=4096: TaggingService(tokenizer, labels, forward, max_length=max_length)


@pytest.fixture(scope="module")
def hf_pipelines(tag_dir):
    from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

    model = AutoModelForTokenClassification.from_pretrained(tag_dir).eval()
    full = pipeline("token-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(tag_dir))
    small = pipeline("token-classification", model=model,
                     tokenizer=AutoTokenizer.from_pretrained(tag_dir, model_max_length=SMALL_CONTEXT))
    return full, small


@pytest.fixture(scope="module")
def hf_tag(hf_pipelines):
    """HF's entities for one text: the pipeline's own `run_single` steps, with the model run once per (text, stride)
    and only the postprocessing repeated per strategy and ignore_labels."""
    from transformers.pipelines.token_classification import AggregationStrategy

    cache = {}

    def run(text, strategy, stride=None, ignore_labels=("O",)):
        pipe = hf_pipelines[0 if stride is None else 1]
        if (text, stride) not in cache:
            pre, forward_params, _ = pipe._sanitize_parameters(
                stride=stride, aggregation_strategy=None if stride is None else "simple")
            cache[text, stride] = [pipe.forward(x, **forward_params) for x in pipe.preprocess(text, **pre)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Tokenizer does not support real words, using fallback heuristic"
            return pipe.postprocess(cache[text, stride], aggregation_strategy=AggregationStrategy(strategy),
                                    ignore_labels=list(ignore_labels))

    return run


def tag(service, request):
    return asyncio.run(service.tag(request))


def assert_same(ours, theirs, text, strategy):
    assert len(ours) == len(theirs)
    for mine, hf in zip(ours, theirs):
        mine = mine.model_dump(exclude_none=True)
        assert mine.keys() == hf.keys()
        assert mine["score"] == pytest.approx(float(hf["score"]), abs=1e-5)
        for key in mine.keys() - {"score", "word"}:
            assert mine[key] == hf[key], (key, mine, hf)
        if mine["word"] != hf["word"]:
            # HF decodes word-aggregated groups twice, which garbles some non-ASCII words; ours decodes once.
            assert strategy in ("first", "average", "max") and "\ufffd" in hf["word"], (mine, hf)
            assert mine["word"] == text[mine["start"]: mine["end"]]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("ignore_labels", [["O"], [], ["O", "B-PER", "I-LOC"]])
def test_parity_with_hf_pipeline(service_factory, hf_tag, strategy, ignore_labels):
    response = tag(service_factory(), {"inputs": TEXTS, "aggregation_strategy": strategy,
                                       "ignore_labels": ignore_labels})
    for text, ours in zip(TEXTS, response.results):
        assert_same(ours, hf_tag(text, strategy, ignore_labels=ignore_labels), text, strategy)


def test_default_ignores_o(service_factory):
    service = service_factory()
    default = tag(service, {"inputs": TEXTS[0], "aggregation_strategy": "simple"}).results[0]
    everything = tag(service, {"inputs": TEXTS[0], "aggregation_strategy": "simple", "ignore_labels": []}).results[0]
    assert default == [e for e in everything if e.entity_group != "O"] and len(default) < len(everything)


def test_offsets_are_characters(service_factory):
    text = TEXTS[1]
    items = tag(service_factory(), {"inputs": text, "ignore_labels": []}).results[0]
    assert items[-1].end == len(text)  # character, not byte, offsets
    assert all(0 <= e.start < e.end <= len(text) for e in items)
    assert [e.index for e in items] == list(range(1, len(items) + 1))  # 0 is <seed:bos>


@pytest.mark.parametrize("stride", [0, 9])
@pytest.mark.parametrize("ignore_labels", [["O"], []])
def test_stride_parity_with_hf_pipeline(service_factory, hf_tag, stride, ignore_labels):
    service = service_factory(SMALL_CONTEXT)
    for strategy in ["simple", "first", "average", "max"]:
        ours = tag(service, {"inputs": LONG_TEXT, "aggregation_strategy": strategy, "stride": stride,
                             "ignore_labels": ignore_labels})
        assert_same(ours.results[0], hf_tag(LONG_TEXT, strategy, stride, ignore_labels), LONG_TEXT, strategy)
    assert ours.usage.prompt_tokens > 2 * SMALL_CONTEXT  # several windows ran


def test_window_split_matches_tokenizers_overflow(service_factory, tag_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tag_dir, model_max_length=SMALL_CONTEXT)
    expected = hf(LONG_TEXT, truncation=True, stride=7, return_overflowing_tokens=True)["input_ids"]
    service = service_factory(SMALL_CONTEXT)
    request = TaggingRequest(inputs=LONG_TEXT, aggregation_strategy="simple", stride=7)
    assert [w.ids for w in preprocess(request, service.tokenizer, SMALL_CONTEXT)] == expected


def test_long_input_needs_stride_or_truncate(service_factory):
    service = service_factory(SMALL_CONTEXT)
    with pytest.raises(InvalidRequest) as err:
        tag(service, {"inputs": ["short", LONG_TEXT]})
    assert err.value.param == "inputs" and "inputs.1" in err.value.message
    truncated = tag(service, {"inputs": LONG_TEXT, "truncate": True, "ignore_labels": []})
    assert len(truncated.results[0]) == SMALL_CONTEXT - 1  # every token but <seed:bos>


@pytest.mark.parametrize("request_, param", [
    ({"inputs": []}, "inputs"),
    ({"inputs": ""}, "inputs.0"),
    ({"inputs": ["a", ""]}, "inputs.1"),
    ({"inputs": 5}, "inputs"),
    ({"inputs": ["a", 5]}, "inputs.1"),
    ({"inputs": "a", "aggregation_strategy": "longest"}, "aggregation_strategy"),
    ({"inputs": "a", "aggregation_strategy": "simple", "stride": -1}, "stride"),
    ({"inputs": "a", "stride": 4}, "stride"),  # stride needs aggregation
    ({"inputs": "a", "aggregation_strategy": "simple", "stride": SMALL_CONTEXT - 1}, "stride"),
    ({"inputs": "a", "ignore_labels": "O"}, "ignore_labels"),
    ({"inputs": "a", "truncate": "yes"}, "truncate"),
    ({"inputs": "a", "aggregation": "simple"}, "aggregation"),
])
def test_bad_requests_name_the_field(service_factory, request_, param):
    with pytest.raises(InvalidRequest) as err:
        tag(service_factory(SMALL_CONTEXT), request_)
    assert err.value.param == param
