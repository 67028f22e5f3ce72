"""Per-request limits (services/limits.py) and the config that carries them: each violation a 4xx naming the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from seedoss.services.errors import InvalidRequest, PayloadTooLarge
from seedoss.services.limits import Limits

LIMITS = Limits(max_n=4, max_stop_strings=2, max_stop_string_chars=5, max_prompt_chars=100, max_client_batch_size=3,
                max_task_tokens=50, max_json_depth=4, max_body_bytes=2048)


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "n": 5}, "n"),
    ({"prompt": "x", "stop": ["a", "b", "c"]}, "stop"),
    ({"prompt": "x", "stop": "abcdef"}, "stop"),
    ({"prompt": "x", "stop": ["ok", "abcdef"]}, "stop"),
    ({"prompt": "x" * 101}, "prompt"),
    ({"prompt": ["x" * 60, "y" * 60]}, "prompt"),  # OpenAI's list of prompts: the total counts
    ({"prompt": ["x"] * 4}, "prompt"),  # more prompts than max_client_batch_size
    ({"prompt": [[5]] * 4}, "prompt"),
    ({"messages": [{"role": "user", "content": "x" * 60}, {"role": "user", "content": "y" * 60}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 101}]}]}, "messages"),
])
def test_generation_limits_name_the_field(body, field):
    with pytest.raises(InvalidRequest) as e:
        LIMITS.check_generation(body)
    assert e.value.param == field and e.value.http_status == 400 and e.value.message.startswith(field)


@pytest.mark.parametrize("body", [
    {"prompt": "x" * 100, "n": 4, "stop": ["abcde", "b"]},
    {"prompt": [1, 2, 3, 4, 5]},  # one tokenized prompt: the token limits of the engine apply
    {"prompt": ["a", "b", "c"]},
    {"messages": [{"role": "user", "content": "x" * 100}]},
    {"prompt": "x", "n": "many", "stop": 7},  # wrong types are the request schema's to reject
])
def test_generation_within_limits_passes(body):
    LIMITS.check_generation(body)


def test_task_limits():
    LIMITS.check_texts("inputs", ["a", "b", "c"])
    with pytest.raises(InvalidRequest, match="inputs: 4 inputs") as e:
        LIMITS.check_texts("inputs", ["a"] * 4)
    assert e.value.param == "inputs"
    with pytest.raises(InvalidRequest, match="101 characters"):
        LIMITS.check_texts("inputs", ["x" * 50, "y" * 51])
    LIMITS.check_task_tokens("inputs", 50)
    with pytest.raises(InvalidRequest) as e:
        LIMITS.check_task_tokens("doc_stride", 51)
    assert e.value.param == "doc_stride" and e.value.code == "request_too_large"


def test_sizes_and_json_depth():
    LIMITS.check_body_size(2048)
    with pytest.raises(PayloadTooLarge) as e:
        LIMITS.check_body_size(2049, "gRPC message")
    assert e.value.http_status == 413 and e.value.grpc_code == "INVALID_ARGUMENT" and "gRPC message" in e.value.message
    LIMITS.check_json_depth({"a": [{"b": [1]}]})  # 4 levels
    with pytest.raises(InvalidRequest, match="deeper than 4"):
        LIMITS.check_json_depth({"a": [{"b": [[1]]}]})
    deep: list = []
    for _ in range(100_000):  # no recursion: a deep value cannot exhaust the checker's stack
        deep = [deep]
    with pytest.raises(InvalidRequest):
        LIMITS.check_json_depth({"x": deep})


def test_defaults_and_validation():
    limits = Limits()
    assert (limits.max_body_bytes, limits.max_n, limits.max_client_batch_size, limits.max_task_tokens) == (
        4 << 20, 16, 32, 32768)
    for bad in ({"max_n": 0}, {"max_body_bytes": 10}, {"max_nn": 3}, {"max_task_tokens": -1}):
        with pytest.raises(ValidationError):
            Limits(**bad)


def test_app_config_embeds_the_limits_and_rejects_blank_keys():
    from seedoss.deployments.config import AppConfig

    cfg = AppConfig.model_validate({"checkpoint": "/m", "limits": {"max_n": 2}, "api_keys": ["k1"]})
    assert cfg.limits == Limits(max_n=2) and cfg.api_keys == ["k1"]
    assert AppConfig(checkpoint="/m").limits == Limits()
    for keys in ([""], ["  "], ["k1", ""], [" k1"], []):
        with pytest.raises(ValidationError, match="api_keys"):
            AppConfig.model_validate({"checkpoint": "/m", "api_keys": keys})
    with pytest.raises(ValidationError, match="max_body_bytes"):  # moved under limits: the old key is an error
        AppConfig.model_validate({"checkpoint": "/m", "max_body_bytes": 1 << 20})


def test_env_keys_fail_closed():
    """The gateway's SEEDOSS_API_KEYS parse: an empty item stops it (never `Authorization: Bearer ` admitted)."""
    from seedoss.deployments.config import resolve_api_keys

    for env in ("a,,b", "a, ", " , ", ","):
        with pytest.raises(ValueError, match="SEEDOSS_API_KEYS"):
            resolve_api_keys(None, env, False)
    assert resolve_api_keys(["k"], "a, b", True) == ["k", "a", "b"]
    assert resolve_api_keys(None, "", False) == resolve_api_keys(None, "  ", False) == []
    with pytest.raises(ValueError, match="require_api_keys"):
        resolve_api_keys(None, "", True)


def test_task_services_refuse_before_any_forward(demo_checkpoint):
    """Inputs, characters and window tokens are checked before the backbone runs (and before windows are built)."""
    import asyncio

    from seedoss.tokenizer import SeedOssTokenizer
    from seedoss.services.classification import ClassificationService
    from seedoss.services.qa import QAService
    from seedoss.services.tagging import TaggingService

    def forward(sequences):
        raise AssertionError("the forward must not run")

    tokenizer = SeedOssTokenizer.from_pretrained(demo_checkpoint)
    limits = Limits(max_client_batch_size=4, max_prompt_chars=20_000, max_task_tokens=2_000)
    classify = ClassificationService(tokenizer, ["a", "b"], forward, max_length=4096, limits=limits)
    tag = TaggingService(tokenizer, ["O", "B-X"], forward, max_length=512, limits=limits)
    qa = QAService(tokenizer, forward, max_length=4096, limits=limits)
    cases = [
        (classify.classify({"inputs": ["x"] * 5}), "inputs", None),
        (classify.classify({"inputs": ["x" * 20_001]}), "inputs", None),
        (classify.classify({"inputs": ["word " * 600] * 4}), "inputs", "request_too_large"),  # ~2400 tokens
        (tag.tag({"inputs": ["word " * 1500], "stride": 500, "aggregation_strategy": "simple"}), "stride",
         "request_too_large"),
        (qa.answer({"question": "q", "context": "word " * 1900, "max_seq_len": 64, "doc_stride": 60}), "doc_stride",
         "request_too_large"),
        (qa.answer({"question": "q", "context": "word " * 1900}), "context", "request_too_large"),  # 384 / 128
        (qa.answer({"question": "q" * 10_000, "context": "c" * 10_001}), "context", None),
    ]
    for call, field, code in cases:
        with pytest.raises(InvalidRequest) as e:
            asyncio.run(call)
        assert (e.value.param, e.value.code) == (field, code), e.value.message
    within = asyncio.run(ClassificationService(tokenizer, ["a", "b"], lambda s: [[0.0, 1.0]] * len(s), max_length=4096,
                                               limits=limits).classify({"inputs": ["word " * 400] * 4}))
    assert within.usage.prompt_tokens <= 2_000


@pytest.mark.parametrize("words, max_seq_len, doc_stride", [
    (5, 64, None), (100, 64, None), (100, 64, 0), (300, 64, 40), (1000, 128, 100), (999, 200, 3),
])
def test_qa_window_tokens_are_computed_exactly_before_the_windows_exist(demo_checkpoint, words, max_seq_len,
                                                                         doc_stride):
    """The QA token check (services/qa.py:window_tokens) counts what `tokenizers` will make, without making it."""
    from seedoss.tokenizer import SeedOssTokenizer
    from seedoss.services.qa import QARequest, preprocess

    tokenizer = SeedOssTokenizer.from_pretrained(demo_checkpoint)
    request = QARequest(question="where is it", context=" ".join(f"w{i}" for i in range(words)),
                        max_seq_len=max_seq_len, doc_stride=doc_stride)
    seen = {}

    class Recording(Limits):
        def check_task_tokens(self, field, total):
            seen["total"] = total

    windows = preprocess(request, tokenizer, 4096, Recording())
    assert seen["total"] == sum(len(w.ids) for w in windows), (len(windows), seen)
