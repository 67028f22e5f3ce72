"""Classification, tagging and QA head services: task logic from `services/`, the head's weights here, the
backbone forward through the shared stage deployments (cache-less, batched `prefill`)."""

from __future__ import annotations

import asyncio
import time

import torch

from seedoss.config import SeedOssConfig
from seedoss.heads import SequenceClassificationHead
from seedoss.loader import load_head
from seedoss.tokenizer import SeedOssTokenizer
from services.classification import ClassificationService
from services.errors import from_exception
from services.limits import Limits
from services.qa import QAService
from services.tagging import TaggingService

from .faults import RetryPolicy, Timeouts
from .metrics import HEAD_LATENCY, HEAD_REQUESTS
from .routing import StageChain

SERVICES = {
    "classify": (ClassificationService, "classify"),
    "tag": (TaggingService, "tag"),
    "qa": (QAService, "answer"),
}


class TaskHead:
    def __init__(self, task: str, head_checkpoint: str, dtype: str, retry: dict, timeouts: dict, *stages,
                 limits: Limits | None = None):
        config = SeedOssConfig.from_pretrained(head_checkpoint)
        self.task = task
        self.head = load_head(head_checkpoint, task, dtype=dtype)
        # cache-less forwards: any stage replica serves them
        self.stages = StageChain(stages, RetryPolicy.model_validate(retry), Timeouts.model_validate(timeouts).stage_s)
        service_cls, method = SERVICES[task]
        kwargs = {} if task == "qa" else {"labels": config.labels}
        service = service_cls(SeedOssTokenizer.from_pretrained(head_checkpoint), forward=self._forward,
                              max_length=config.max_position_embeddings, limits=limits, **kwargs)
        self._handle = getattr(service, method)

    async def _forward(self, sequences: list[list[int]]):
        hidden = await self.stages.prefill(sequences)
        args = (hidden, sequences) if isinstance(self.head, SequenceClassificationHead) else (hidden,)
        return await asyncio.to_thread(self._run_head, *args)

    @torch.inference_mode()
    def _run_head(self, *args):
        return self.head(*args)

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
        await self._forward([[0, 5]])  # the whole stage chain answers
        return True
