"""Batching across requests (`deployments/batching.py`) on the demo checkpoint's heads, in process: requests of
different lengths and options packed into shared forwards get exactly what each gets alone, and what the services
get without batching."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from seedoss.deployments.batching import BatchedHead, BatchingConfig, TokenBatcher
from seedoss.config import SeedOssConfig
from seedoss.demo import head_dir
from seedoss.loader import load_head, load_stage
from seedoss.model import StepBatch
from seedoss.tokenizer import SeedOssTokenizer
from seedoss.services.classification import ClassificationService
from seedoss.services.embeddings import EmbeddingService
from seedoss.services.errors import Overloaded
from seedoss.services.qa import QAService
from seedoss.services import schemas
from seedoss.services.schemas import local_forward
from seedoss.services.tagging import TaggingService

CONTEXT = ("Ada Lovelace met Charles Babbage in London in 1833. They wrote about the Analytical Engine, a machine "
           "Babbage designed. Lovelace published notes on it in 1843, including an algorithm. ") * 3
REQUESTS = [
    ("classify", {"inputs": "ok"}),
    ("classify", {"inputs": ["I loved this film, every minute of it.", "Terrible service — never again!"],
                  "top_k": 1}),
    ("tag", {"inputs": "Ada Lovelace met Charles Babbage in London.", "aggregation_strategy": "simple",
             "ignore_labels": []}),
    ("classify", {"inputs": ["Ça va, 東京 est loin 🚄", "a b c d e f g h i j k l m n o p"],
                  "function_to_apply": "sigmoid", "full_probabilities": True}),
    ("qa", {"question": "Where did they meet?", "context": CONTEXT, "max_seq_len": 48, "doc_stride": 16,
            "top_k": 3}),
    ("tag", {"inputs": ["Zoë lives in Zürich", CONTEXT], "aggregation_strategy": "first"}),
    ("classify", {"inputs": "what a lovely day", "top_k": 2, "raw_scores": True}),
    ("qa", {"question": "Who designed it?", "context": "Babbage designed the engine.",
            "handle_impossible_answer": True}),
    ("tag", {"inputs": CONTEXT, "aggregation_strategy": "average", "stride": 8, "truncate": False}),
    ("classify", {"inputs": ["short", CONTEXT, "medium length text here"], "top_k": 3}),
]


class CountingBackbone:
    """The full-depth demo backbone in process, recording the sequences of every forward."""

    def __init__(self, stage):
        self.stage, self.batches = stage, []

    async def __call__(self, sequences: list[list[int]]) -> torch.Tensor:
        self.batches.append([list(s) for s in sequences])
        return await asyncio.to_thread(self._run, sequences)

    @torch.inference_mode()
    def _run(self, sequences):
        batch = StepBatch(list(range(len(sequences))), [len(s) for s in sequences], [0] * len(sequences))
        return self.stage(torch.tensor([t for s in sequences for t in s]), batch)


@pytest.fixture(scope="module")
def heads(demo_checkpoint):
    """task → (service class, method, tokenizer, head, extra kwargs) for the three demo heads."""
    out = {}
    for task, cls, method in [("classify", ClassificationService, "classify"), ("tag", TaggingService, "tag"),
                              ("qa", QAService, "answer")]:
        path = head_dir(demo_checkpoint, task)
        kwargs = {} if task == "qa" else {"labels": SeedOssConfig.from_pretrained(path).labels}
        out[task] = (cls, method, SeedOssTokenizer.from_pretrained(path), load_head(path, task), kwargs)
    return out


@pytest.fixture(scope="module")
def stage(demo_checkpoint):
    return load_stage(demo_checkpoint)


def services(heads, forward_of):
    """task → the bound service method whose forward is `forward_of(head)`."""
    return {task: getattr(cls(tok, forward=forward_of(head), max_length=4096, **kwargs), method)
            for task, (cls, method, tok, head, kwargs) in heads.items()}


def dumped(response) -> dict:
    return response.model_dump(mode="json", exclude_none=True)


def test_mixed_batches_equal_requests_alone(heads, stage):
    backbone = CountingBackbone(stage)
    # small batches and a real wait, so requests are split across batches and batches mix requests and tasks' lengths
    config = BatchingConfig(max_batch_tokens=96, max_wait_ms=20, max_concurrent_batches=2)
    batched = services(heads, lambda head: BatchedHead(backbone, head, config))
    plain = services(heads, lambda head: local_forward(stage, head))

    async def alone():
        return [dumped(await batched[task](body)) for task, body in REQUESTS]

    async def together():
        return [dumped(r) for r in await asyncio.gather(*[batched[task](body) for task, body in REQUESTS])]

    async def unbatched():
        return [dumped(await plain[task](body)) for task, body in REQUESTS]

    reference = asyncio.run(unbatched())
    assert asyncio.run(alone()) == reference
    forwards_alone = len(backbone.batches)
    backbone.batches.clear()
    assert asyncio.run(together()) == reference  # exactly: floats compared as they are
    assert len(backbone.batches) < forwards_alone
    assert max(map(len, backbone.batches)) > 3  # no request has more than 3 texts: requests did share a forward
    sizes = [sum(map(len, b)) for b in backbone.batches]
    assert all(n <= 96 for n, b in zip(sizes, backbone.batches) if len(b) > 1)  # bounded by tokens...
    assert any(n > 96 for n in sizes)  # ...except a sequence longer than the bound, which runs alone


def test_one_request_never_waits_and_failures_stay_in_their_batch():
    calls = []

    async def forward(items):
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("bad item")
        await asyncio.sleep(0.05)
        return [x.upper() for x in items]

    batcher = TokenBatcher(forward, list, max_batch_tokens=8, max_wait_ms=10_000, max_concurrent_batches=1)

    async def main():
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await batcher(["ab", "c"]) == ["AB", "C"]
        assert loop.time() - start < 5  # nothing in flight: no max_wait
        first = asyncio.ensure_future(batcher(["x"]))
        await asyncio.sleep(0)  # `first` runs alone; the next three queue behind it and share one batch
        results = await asyncio.gather(batcher(["d", "e"]), batcher(["bad"]), batcher(["fff"]), return_exceptions=True)
        assert await first == ["X"]
        assert loop.time() - start < 5  # the queued batch started when the one in flight ended, not after max_wait
        return results

    ok, bad, other = asyncio.run(main())
    assert calls[-1] == ["d", "e", "bad", "fff"]
    assert isinstance(bad, ValueError) and isinstance(other, ValueError) and isinstance(ok, ValueError)

    async def after():  # the batcher keeps working afterwards (and on a new event loop)
        return await asyncio.gather(batcher(["g"]), batcher(["hh", "i"]))

    assert asyncio.run(after()) == [["G"], ["HH", "I"]]


def test_requests_past_max_concurrent_requests_are_answered_429_at_once():
    release = None

    async def forward(items):
        await release.wait()
        return [x.upper() for x in items]

    batcher = TokenBatcher(forward, list, max_batch_tokens=8, max_concurrent_batches=1, max_concurrent_requests=3)

    async def main():
        nonlocal release
        release = asyncio.Event()
        held = [asyncio.ensure_future(batcher([c])) for c in "abc"]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as refused:
            await batcher(["d"])  # refused without waiting for the forward
        assert refused.value.http_status == 429 and refused.value.retry_after
        release.set()
        assert [await h for h in held] == [["A"], ["B"], ["C"]]
        return await batcher(["e"])  # room again once those were answered

    assert asyncio.run(main()) == ["E"] and batcher.requests == 0


@pytest.mark.parametrize("loop_factory", [None, "uvloop"])  # Serve replicas run uvloop
def test_waves_of_concurrent_requests_all_complete(loop_factory):
    """Many short waits while batches are in flight (the scheduler's timer path): no request is ever left behind."""
    async def forward(items):
        await asyncio.sleep(0.001)
        return items

    batcher = TokenBatcher(forward, list, max_batch_tokens=64, max_wait_ms=0.3, max_concurrent_batches=2)

    async def wave(n):
        await asyncio.sleep(n * 0.0003)  # arrivals trickle in while batches are in flight
        return await asyncio.gather(*[batcher([f"{n}-{k}"]) for k in range(1 + n % 3)])

    async def main():
        return await asyncio.wait_for(asyncio.gather(*[wave(n) for n in range(300)]), timeout=20)

    if loop_factory == "uvloop":
        loop_factory = pytest.importorskip("uvloop").new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        assert runner.run(main()) == [[[f"{n}-{k}"] for k in range(1 + n % 3)] for n in range(300)]


class ThreadRecordingTokenizer:
    """The real tokenizer, noting the thread of every method call (encode, windows, offsets, decode)."""

    def __init__(self, tokenizer):
        self._tokenizer, self.threads = tokenizer, []

    def __getattr__(self, name):
        value = getattr(self._tokenizer, name)
        if not callable(value):
            return value

        def call(*args, **kwargs):
            self.threads.append(threading.current_thread().name)
            return value(*args, **kwargs)

        return call


@pytest.mark.parametrize("inline_size", [0, schemas.INLINE_SIZE])
def test_head_services_tokenize_long_texts_off_the_event_loop(heads, stage, demo_checkpoint, monkeypatch,
                                                               inline_size):
    """With an executor (a head replica's one tokenize thread) every tokenizer call of every task for a request
    with more text than `INLINE_SIZE` runs there, not on the event loop the replica's concurrent requests share,
    and a shorter request's on the loop (the thread hop would cost more than its tokenizing); the answers are what
    they are without an executor. (These requests are short: with `INLINE_SIZE` 0 every one counts as long.)"""
    monkeypatch.setattr(schemas, "INLINE_SIZE", inline_size)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="head-tokenize")
    recorded = {task: (cls, method, ThreadRecordingTokenizer(tok), head, kwargs)
                for task, (cls, method, tok, head, kwargs) in heads.items()}
    offloaded = {task: getattr(cls(tok, forward=local_forward(stage, head), max_length=4096, executor=pool, **kwargs),
                               method)
                 for task, (cls, method, tok, head, kwargs) in recorded.items()}
    plain = services(heads, lambda head: local_forward(stage, head))
    embed_tokenizer = ThreadRecordingTokenizer(SeedOssTokenizer.from_pretrained(demo_checkpoint))
    config = SeedOssConfig.from_pretrained(demo_checkpoint)
    embed = EmbeddingService(embed_tokenizer, local_forward(stage, lambda hidden: hidden), max_length=4096,
                             vocab_size=config.vocab_size, executor=pool).embed
    embed_inline = EmbeddingService(SeedOssTokenizer.from_pretrained(demo_checkpoint),
                                    local_forward(stage, lambda hidden: hidden), max_length=4096,
                                    vocab_size=config.vocab_size).embed
    texts = {"input": ["Ada Lovelace met Charles Babbage.", CONTEXT]}

    async def run(table, embedding):
        return await asyncio.gather(*[table[task](body) for task, body in REQUESTS], embedding(texts))

    try:
        got = [dumped(r) for r in asyncio.run(run(offloaded, embed))]
    finally:
        pool.shutdown()
    assert got == [dumped(r) for r in asyncio.run(run(plain, embed_inline))]
    threads = [name for _, _, tok, _, _ in recorded.values() for name in tok.threads] + embed_tokenizer.threads
    assert len(threads) >= len(REQUESTS) + 1
    if inline_size:
        texts = [[body[key] for key in ("inputs", "question", "context") if key in body] for _, body in REQUESTS]
        assert max(schemas.text_size(*text) for text in texts) <= inline_size
        assert set(threads) == {threading.current_thread().name}
    else:
        assert all(name.startswith("head-tokenize") for name in threads), set(threads)
