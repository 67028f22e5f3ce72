"""How the engine reaches its stages.

A `Pipeline` runs one micro-batch through every stage and returns the last stage's hidden states. The local
form chains `LocalStageExecutor`s (a `seedoss` Stage in a worker thread of this process); the Ray Serve form
(deployments/) chains DeploymentResponses so hidden states go stage to stage without the caller. Each stage
runs its forwards one at a time in arrival order, so different micro-batches can occupy different stages at
once (pipeline parallelism) while each stage's KV cache sees a consistent sequence of steps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Protocol

import torch

from ..model import Stage, StepBatch
from .errors import KVCacheFull

log = logging.getLogger(__name__)


class Pipeline(Protocol):
    num_stages: int
    # How many micro-batches the engine keeps in flight: one per stage when each stage computes on its own
    # (threads or replicas: different micro-batches occupy different stages at once), one when every stage runs
    # on one thread (a second micro-batch would only wait, and read every weight once more per token).
    micro_batches: int
    num_blocks: int  # KV capacity of the smallest stage cache, in blocks of block_size tokens
    block_size: int
    # Where the engine runs the LM head and sampling; None: a thread of its own. An in-process pipeline offers
    # its last stage's thread: one OpenMP team then does all the math (two teams on the same cores spin against
    # each other between parallel regions: 30% slower decode at 32 sequences on 2 cores).
    head_executor: Executor | None

    async def run(self, tokens: torch.Tensor, seq_ids: list[str], query_lens: list[int], context_lens: list[int],
                  block_hashes: list[tuple[int, list[bytes]]] | None = None) -> torch.Tensor:
        """Packed token ids through every stage → final hidden states [T, hidden]. Raises MissingSequenceCache
        when a stage lacks a sequence's cached context. `block_hashes`: `StepBatch.block_hashes`."""

    def free(self, seq_ids: list[str]) -> None:
        """Drop these sequences' KV cache in every stage. Submitted at once, ordered before any later step."""


class LocalStageExecutor:
    """A stage, its KV cache and the one thread that runs its math.

    `stage` may be a function that loads it: it then runs on that thread too, like everything else that makes
    torch fork an OpenMP team (loading and prepacking, the cache's zero fill, packing a batch's sequences, the
    forwards). Each thread that runs a parallel op gets a team of its own, and once a process's teams hold more
    threads than it has cores, libgomp stops spinning between parallel regions: a 2-thread batch-1 decode step of
    the small preset took 21.4 ms on a worker thread after the main thread had loaded the weights, 16.5 ms with
    everything on one thread (2 cores)."""

    def __init__(self, stage: Stage | Callable[[], Stage], kv_budget_bytes: int, block_size: int = 16,
                 worker: ThreadPoolExecutor | None = None):
        """`worker`: a one-thread pool to run on, shared with other stages of this process (default: a new one)."""
        self.worker = worker or ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage")
        self.stage, self.cache = self.worker.submit(self._build, stage, kv_budget_bytes, block_size).result()
        self.num_blocks, self.block_size = self.cache.num_blocks, block_size
        self._forward_started: float | None = None  # when the forward now running began (None: idle)

    @staticmethod
    def _build(stage, kv_budget_bytes: int, block_size: int):
        stage = stage if isinstance(stage, Stage) else stage()
        return stage, stage.new_kv_cache(kv_budget_bytes, block_size)

    def busy_for(self) -> float:
        """Seconds the forward now running has taken so far (0 when idle); read without queueing on the worker."""
        started = self._forward_started
        return 0.0 if started is None else time.monotonic() - started

    def _forward(self, inputs, seq_ids, query_lens, context_lens, use_cache, block_hashes=None, clock=None,
                 threads=None):
        self._forward_started = time.monotonic()
        if clock is not None:
            clock.append(time.time())
        base = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            return self._run(inputs, seq_ids, query_lens, context_lens, use_cache, block_hashes)
        finally:
            if threads:
                torch.set_num_threads(base)
            self._forward_started = None
            if clock is not None:
                clock.append(time.time())

    def _run(self, inputs, seq_ids, query_lens, context_lens, use_cache, block_hashes=None):
        if isinstance(inputs, list):  # the sequences of a batch, packed here rather than on the caller's thread
            inputs = torch.cat(inputs)
        batch = StepBatch(seq_ids, query_lens, context_lens, block_hashes)
        if not use_cache:
            return self.stage(inputs, batch)
        try:
            return self.stage(inputs, batch, self.cache)
        except KVCacheFull:
            # Sequences nobody freed here (their steps went to another replica, or their free was lost) hold
            # blocks: drop the least recently used; if one of them comes back, it is recomputed.
            needed = sum(self.cache.blocks_needed(s, c + q) for s, q, c in zip(seq_ids, query_lens, context_lens))
            evicted = self.cache.evict_lru(needed, keep=set(seq_ids))
            log.warning("stage %d-%d evicted %d idle sequences to make room", self.stage.start, self.stage.end, len(evicted))
            return self.stage(inputs, batch, self.cache)

    async def forward(self, inputs, seq_ids, query_lens, context_lens, use_cache: bool = True, block_hashes=None,
                      clock: list[float] | None = None, threads: int | None = None):
        """One step of these sequences through this stage (`use_cache=False`: a cache-less prefill). `clock`, when
        given, gets the wall-clock times the worker thread started and ended the forward (the Serve stage reports
        them per step: deployments/timing.py); `threads`: torch threads for this forward only."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.worker, self._forward, inputs, seq_ids, query_lens, context_lens,
                                          use_cache, block_hashes, clock, threads)

    def _free(self, seq_ids):
        for s in seq_ids:
            self.cache.free(s)

    def free(self, seq_ids):
        self.worker.submit(self._free, list(seq_ids))

    def cache_stats(self) -> dict:
        """KV usage as seen after every forward and free submitted so far."""
        def read():
            return {"blocks_in_use": self.cache.num_blocks - self.cache.num_free_blocks,
                    "num_blocks": self.cache.num_blocks, "sequences": self.cache.num_sequences,
                    "cached_blocks": len(self.cache.blocks.cached)}
        return self.worker.submit(read).result()

    def close(self) -> None:
        self.worker.shutdown(wait=False)


class LocalPipeline:
    def __init__(self, executors: list[LocalStageExecutor]):
        self.executors = executors
        self.num_stages = len(executors)
        self.block_size = executors[0].block_size
        if any(e.block_size != self.block_size for e in executors):
            raise ValueError("all stages must use the same KV block size")
        self.num_blocks = min(e.num_blocks for e in executors)
        self.head_executor = executors[-1].worker
        self.micro_batches = len({id(e.worker) for e in executors})  # stages that can compute at once

    async def run(self, tokens, seq_ids, query_lens, context_lens, block_hashes=None):
        x = tokens
        for executor in self.executors:
            x = await executor.forward(x, seq_ids, query_lens, context_lens, block_hashes=block_hashes)
        return x

    def free(self, seq_ids):
        for executor in self.executors:
            executor.free(seq_ids)

    def cache_stats(self) -> list[dict]:
        return [e.cache_stats() for e in self.executors]

    def close(self) -> None:
        for executor in self.executors:
            executor.close()
