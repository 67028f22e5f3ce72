"""Stage executors: how the engine reaches one pipeline stage.

`StageExecutor` is the interface; `LocalStageExecutor` runs a `seedoss` Stage in this process, and the Ray
Serve deployment supplies a remote form. Every executor runs its own forwards one at a time in arrival order,
so different micro-batches can occupy different stages at once (pipeline parallelism) while each stage's KV
cache sees a consistent sequence of steps.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch

from ..model import Stage, StepBatch


class StageExecutor(Protocol):
    num_blocks: int  # KV cache capacity, in blocks of block_size tokens
    block_size: int

    async def forward(self, inputs: torch.Tensor, seq_ids: list[str], query_lens: list[int],
                      context_lens: list[int]) -> torch.Tensor:
        """Run the stage on packed inputs; raises MissingSequenceCache when it lacks a sequence's context."""

    def free(self, seq_ids: list[str]) -> None:
        """Drop these sequences' KV cache. Submitted at once, ordered before any later forward; not awaited."""


class LocalStageExecutor:
    def __init__(self, stage: Stage, kv_budget_bytes: int, block_size: int = 16):
        self.stage = stage
        self.cache = stage.new_kv_cache(kv_budget_bytes, block_size)
        self.num_blocks, self.block_size = self.cache.num_blocks, block_size
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stage{stage.start}-{stage.end}")

    def _forward(self, inputs, seq_ids, query_lens, context_lens):
        return self.stage(inputs, StepBatch(seq_ids, query_lens, context_lens), self.cache)

    async def forward(self, inputs, seq_ids, query_lens, context_lens):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, self._forward, inputs, seq_ids, query_lens, context_lens)

    def _free(self, seq_ids):
        for s in seq_ids:
            self.cache.free(s)

    def free(self, seq_ids):
        self._worker.submit(self._free, list(seq_ids))

    def cache_stats(self) -> dict:
        """KV usage as seen after every forward and free submitted so far."""
        def read():
            return {"blocks_in_use": self.cache.num_blocks - self.cache.num_free_blocks,
                    "num_blocks": self.cache.num_blocks, "sequences": self.cache.num_sequences}
        return self._worker.submit(read).result()

    def close(self) -> None:
        self._worker.shutdown(wait=False)
