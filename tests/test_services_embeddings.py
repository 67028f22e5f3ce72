"""Embeddings (services/embeddings.py) against transformers' bare `SeedOssModel` on the demo checkpoint: its last
hidden state, pooled the same way, within 1e-5, for a batch of inputs of different lengths."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
import torch
from transformers import SeedOssModel

from seedoss.config import SeedOssConfig
from seedoss.loader import load_stage
from seedoss.tokenizer import SeedOssTokenizer
from seedoss.services.embeddings import EmbeddingService, PoolingConfig
from seedoss.services.errors import InvalidRequest
from seedoss.services.schemas import local_forward

TEXTS = ["Hello world", "The history of the city is long and full of surprises, wars and bridges", "a",
         "Ελληνικά και 日本語 mixed with English words"]
LONG = " ".join(str(i) for i in range(5000))  # more tokens than the demo's 4096-token context


@pytest.fixture(scope="module")
def service(demo_checkpoint):
    config = SeedOssConfig.from_pretrained(demo_checkpoint)
    tokenizer = SeedOssTokenizer.from_pretrained(demo_checkpoint)
    stage = load_stage(demo_checkpoint)
    return EmbeddingService(tokenizer, local_forward(stage, lambda hidden: hidden),
                            max_length=config.max_position_embeddings, vocab_size=config.vocab_size)


@pytest.fixture(scope="module")
def reference(demo_checkpoint):
    """Per text, transformers' last hidden state [tokens, hidden] (one text at a time: no padding involved)."""
    model = SeedOssModel.from_pretrained(demo_checkpoint).eval()
    tokenizer = SeedOssTokenizer.from_pretrained(demo_checkpoint)
    out = []
    for text in TEXTS:
        with torch.no_grad():
            out.append(model(torch.tensor([tokenizer.encode(text)])).last_hidden_state[0].numpy())
    return out


def embed(service, body):
    return asyncio.run(service.embed(body))


def _pooled(states, pooling):
    return np.stack([s[-1] if pooling == "last" else s[0] if pooling == "cls" else s.mean(axis=0) for s in states])


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("pooling", ["last", "mean", "cls"])
@pytest.mark.parametrize("normalize", [True, False])
def test_embeddings_equal_transformers_pooled_the_same_way(service, reference, pooling, normalize):
    response = embed(service, {"input": TEXTS, "pooling": pooling, "normalize": normalize})
    got = np.array([d.embedding for d in response.data])
    expected = _pooled(reference, pooling)
    expected = _unit(expected) if normalize else expected
    assert [d.index for d in response.data] == list(range(len(TEXTS)))
    assert np.abs(got - expected).max() <= 1e-5
    assert response.usage.prompt_tokens == sum(len(r) for r in reference)


def test_defaults_dimensions_base64_and_token_ids(service, reference, demo_checkpoint):
    tokenizer = SeedOssTokenizer.from_pretrained(demo_checkpoint)
    default = np.array(embed(service, {"input": TEXTS}).data[0].embedding)
    assert np.abs(default - _unit(reference[0][-1])).max() <= 1e-5  # last token, normalised
    short = embed(service, {"input": TEXTS[1], "dimensions": 16, "normalize": True}).data[0].embedding
    assert np.abs(np.array(short) - _unit(reference[1][-1][:16])).max() <= 1e-5  # cut, then normalised again
    packed = embed(service, {"input": TEXTS[1], "encoding_format": "base64"}).data[0].embedding
    assert np.abs(np.frombuffer(base64.b64decode(packed), "<f4") - _unit(reference[1][-1])).max() <= 1e-5
    ids = [tokenizer.encode(t) for t in TEXTS[:2]]  # token ids are used as given (no second <seed:bos>)
    by_ids = embed(service, {"input": ids}).data
    assert np.abs(np.array(by_ids[1].embedding) - _unit(reference[1][-1])).max() <= 1e-5
    assert embed(service, {"input": ids[0]}).data[0].embedding == by_ids[0].embedding  # one list of ids


@pytest.mark.parametrize("body, param", [
    ({"input": []}, "input"),
    ({"input": ""}, "input"),
    ({"input": ["a", [1, 2]]}, "input"),
    ({"input": [[1, 10**6]]}, "input"),
    ({"input": [[-1]]}, "input"),
    ({"input": [[1, True]]}, "input"),
    ({"input": {"text": "a"}}, "input"),
    ({"input": "a", "dimensions": 0}, "dimensions"),
    ({"input": "a", "dimensions": 10**6}, "dimensions"),
    ({"input": "a", "pooling": "max"}, "pooling"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "a", "temperature": 1}, "temperature"),
    ({"input": LONG}, "input"),
])
def test_bad_requests_name_the_field(service, body, param):
    with pytest.raises(InvalidRequest) as e:
        embed(service, body)
    assert e.value.param == param, e.value.message


def test_per_token_hidden_states_equal_transformers(service, reference):
    response = embed(service, {"input": TEXTS[:2], "pooling": "none"})
    for got, expected in zip(response.data, reference[:2]):
        assert np.abs(np.array(got.embedding) - expected).max() <= 1e-5


def test_the_limits_of_the_other_heads_apply(demo_checkpoint):
    from seedoss.services.limits import Limits

    config = SeedOssConfig.from_pretrained(demo_checkpoint)
    limited = EmbeddingService(SeedOssTokenizer.from_pretrained(demo_checkpoint), lambda s: None,
                               max_length=config.max_position_embeddings, vocab_size=config.vocab_size,
                               limits=Limits(max_client_batch_size=2, max_prompt_chars=60, max_task_tokens=12))
    for body, message in [({"input": ["a", "b", "c"]}, "3 inputs"), ({"input": [[1]] * 3}, "3 inputs"),
                          ({"input": "x" * 61}, "61 characters"), ({"input": TEXTS[3]}, "tokens")]:
        with pytest.raises(InvalidRequest, match=message) as e:
            embed(limited, body)
        assert e.value.param == "input"


def test_long_inputs_are_truncated_when_asked(service, reference):
    long = embed(service, {"input": LONG, "truncate": True})
    assert long.usage.prompt_tokens == service.max_length


def test_pooling_config_from_a_sentence_transformers_layout(tmp_path):
    assert PoolingConfig.from_checkpoint(tmp_path) == PoolingConfig(pooling="last", normalize=True)
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}))
    assert PoolingConfig.from_checkpoint(tmp_path) == PoolingConfig(pooling="mean", normalize=False)
    modules = json.loads((tmp_path / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    assert PoolingConfig.from_checkpoint(tmp_path) == PoolingConfig(pooling="mean", normalize=True)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match="exactly one"):
        PoolingConfig.from_checkpoint(tmp_path)
