"""vLLM's pooling runner classifies with the demo checkpoint's classify head (`SeedOssForSequenceClassification`)
exactly as transformers does: the probabilities of the same inputs within 1e-5 (tracker issue 14).

Runs only where vllm is installed (`.venv-vllm`); the main suite skips it. One engine start (module fixture), in
process, CPU, float32, a handful of short inputs: it must stay cheap in CI."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm.v1.engine.async_llm")  # not plain "vllm": this directory is a namespace package of that name

import torch

pytestmark = pytest.mark.timeout(600)
INPUTS = ["The quick brown fox", "I loved this film, every minute of it.", "bad", "Once upon a time there was a king"]
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # the engine core in this process: no spawn, quicker start


@pytest.fixture(scope="module")
def head(demo_checkpoint):
    from seedoss.demo import head_dir

    return str(head_dir(demo_checkpoint, "classify"))


@pytest.fixture(scope="module")
def hf_probs(head):
    """transformers' probabilities, computed before vLLM starts (an in-process vLLM engine replaces the seed_oss
    backbone in transformers' AutoModel mapping with its own, which cannot be built outside vLLM)."""
    from transformers import AutoTokenizer, SeedOssForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(head)
    model = SeedOssForSequenceClassification.from_pretrained(head, dtype=torch.float32).eval()
    assert model.config.num_labels == 3
    with torch.no_grad():
        return [torch.softmax(model(**tokenizer(text, return_tensors="pt")).logits[0].double(), -1)
                for text in INPUTS]


@pytest.fixture(scope="module")
def vllm_probs(head, hf_probs):
    saved = {key: os.environ.get(key) for key in CPU_ENV}
    for key, value in CPU_ENV.items():
        os.environ.setdefault(key, value)
    try:
        from vllm import LLM

        llm = LLM(model=head, tokenizer=head, runner="pooling", dtype="float32", gpu_memory_utilization=0.3,
                  max_model_len=256, max_num_seqs=8, seed=0, enforce_eager=True)
        yield [list(out.outputs.probs) for out in llm.classify(INPUTS)]
        del llm
    finally:  # the later modules (test_vllm_serve's Ray workers inherit this environment) see it as it was
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_classify_probabilities_equal_transformers(hf_probs, vllm_probs):
    assert len(vllm_probs) == len(hf_probs) == len(INPUTS)
    for text, probs, want in zip(INPUTS, vllm_probs, hf_probs):
        assert len(probs) == 3
        assert torch.allclose(torch.tensor(probs, dtype=torch.float64), want, rtol=0, atol=1e-5), (text, probs, want)
