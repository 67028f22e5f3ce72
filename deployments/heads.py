"""Classification, tagging, QA and embedding head services: task logic from `services/`, the head's weights here
(embeddings have none: they pool the backbone's final hidden states), the backbone forward through the shared stage
deployments (cache-less `prefill`). The sequences of concurrent requests (texts, tagging windows, QA windows,
embedding inputs) are packed into shared forwards by a `TokenBatcher` (`AppConfig.batching`): one stage-chain call
per batch, not per request."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch

from seedoss.config import SeedOssConfig
from seedoss.loader import load_head
from seedoss.tokenizer import SeedOssTokenizer
from seedoss.services.classification import ClassificationService
from seedoss.services.embeddings import EmbeddingService, PoolingConfig
from seedoss.services.errors import from_exception
from seedoss.services.limits import Limits
from seedoss.services.qa import QAService
from seedoss.services.tagging import TaggingService

from .batching import BatchedHead, BatchingConfig
from .faults import RetryPolicy, Timeouts
from .metrics import HEAD_LATENCY, HEAD_REQUESTS
from .routing import StageChain, wire_row_bytes

SERVICES = {
    "classify": (ClassificationService, "classify"),
    "tag": (TaggingService, "tag"),
    "qa": (QAService, "answer"),
}


class TaskHead:
    def __init__(self, task: str, head_checkpoint: str, dtype: str, retry: dict, timeouts: dict, batching: dict,
                 *stages, limits: Limits | None = None, stage_transport: str = "direct"):
        config = SeedOssConfig.from_pretrained(head_checkpoint)
        tokenizer = SeedOssTokenizer.from_pretrained(head_checkpoint)
        self.task = task
        # cache-less forwards: any stage replica serves them
        self.stages = StageChain(stages, RetryPolicy.model_validate(retry), Timeouts.model_validate(timeouts).stage_s,
                                 row_bytes=wire_row_bytes(config, dtype), direct=stage_transport == "direct")
        # embeddings have no head weights: the final hidden states themselves are pooled by the service
        head = torch.nn.Identity() if task == "embed" else load_head(head_checkpoint, task, dtype=dtype)
        self.forward = BatchedHead(self.stages.prefill, head, BatchingConfig.model_validate(batching),
                                   name=task)
        # Tokenization (and tagging's offset alignment) off the event loop that every concurrent request of this
        # replica shares, in one bounded thread: one is enough beside a backbone forward per batch, and QA's
        # windowing sets the tokenizer's truncation for its call, so two must not overlap.
        self.tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{task}-tokenize")
        if task == "embed":
            self._handle = EmbeddingService(
                tokenizer, forward=self.forward, max_length=config.max_position_embeddings,
                vocab_size=config.vocab_size, pooling=PoolingConfig.from_checkpoint(head_checkpoint), limits=limits,
                executor=self.tokenize_pool).embed
            return
        service_cls, method = SERVICES[task]
        kwargs = {} if task == "qa" else {"labels": config.labels}
        service = service_cls(tokenizer, forward=self.forward, max_length=config.max_position_embeddings,
                              limits=limits, executor=self.tokenize_pool, **kwargs)
        self._handle = getattr(service, method)

    async def __call__(self, body: dict) -> dict:
        start = time.monotonic()
        try:
            response = await self._handle(body)
        except Exception as e:
            error = from_exception(e)
            HEAD_REQUESTS.inc(tags={"task": self.task, "outcome": type(error).__name__})
            raise error from None
        HEAD_REQUESTS.inc(tags={"task": self.task, "outcome": "ok"})
        HEAD_LATENCY.observe(time.monotonic() - start, tags={"task": self.task})
        return response.model_dump(mode="json", exclude_none=True)

    async def ready(self) -> bool:
        await self.forward.forward_batch([[0, 5]])  # the whole stage chain answers (not queued behind requests)
        return True
