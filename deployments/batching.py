"""Batching across requests: the sequences of concurrent requests share one forward (TEI's dynamic batching).

Many clients sending one short text each is the common load of the head services. Run one by one, every request
pays the whole stage chain (a Serve hop per stage) for a few tokens; packed together, a batch of them costs about
what one does. `TokenBatcher` does the packing in front of any forward over a list of items (token-id sequences at
a head, hidden-state rows at a stage):

- A request hands in its items and awaits its result. Items queue in arrival order; a batch takes them from the
  front until the next would pass `max_batch_tokens` (a request may be split across batches at item boundaries;
  an item longer than the bound runs alone, so no request is refused for it).
- A batch starts at once when nothing is in flight (a lone request waits for nobody), else when it is full or its
  oldest item has waited `max_wait_ms`, and only while fewer than `max_concurrent_batches` are in flight (2 keeps
  both halves of a 2-stage pipeline busy; excess load accumulates into the next, larger batch instead of into more
  concurrent forwards — throughput grows with load rather than collapsing).
- The forward returns one output per item; each request gets `combine` of its items' outputs, in its own order. A
  forward that fails fails the requests with items in it; a request whose caller went away drops its queued items.

Results do not depend on the batch: the backbone attends within each packed sequence only, and every head reads
its own sequence's rows (`tests/test_batching.py` checks mixed batches against requests run alone).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from seedoss.heads import SequenceClassificationHead
from seedoss.services.errors import Overloaded

from .metrics import BATCH_SEQUENCES, BATCH_TOKENS

Item = TypeVar("Item")


class BatchingConfig(BaseModel):
    """How a head replica packs concurrent requests into backbone forwards (`AppConfig.batching`); the stages pack
    concurrent calls up to the same `max_batch_tokens`."""

    model_config = ConfigDict(extra="forbid")

    max_batch_tokens: int = Field(16384, ge=1, description="tokens per forward (TEI's max_batch_tokens); a single "
                                  "longer sequence runs alone")
    # Waiting only ever happens while another batch is in flight, and ends when that batch finishes: on a fast
    # backend this is no wait at all. On the 2-core demo box a batch's round trip is 20-35 ms, and 5 ms (was 2) made
    # batches of single-text classify requests larger and the heads ~10% faster at 32 clients (bench/RESULTS.md).
    max_wait_ms: float = Field(5.0, ge=0, description="how long a batch that is not full waits for more requests "
                               "while another batch is in flight (a lone request never waits; the wait ends when "
                               "the batch in flight finishes)")
    max_concurrent_batches: int = Field(2, ge=1, description="forwards in flight per head replica")
    max_concurrent_requests: int = Field(
        128, ge=1, description="requests one head (per replica) holds, queued or in a forward (TEI's "
        "max_concurrent_requests); more are answered 429 at once instead of waiting without bound")


class _Request(Generic[Item]):
    """One caller's items, the outputs gathered so far, and the future it awaits."""

    def __init__(self, items: Sequence[Item], future: asyncio.Future):
        self.items, self.future = items, future
        self.next = 0  # the first item not yet taken into a batch
        self.outputs: list[Any] = [None] * len(items)
        self.missing = len(items)
        self.queued_at = time.monotonic()


class TokenBatcher(Generic[Item]):
    def __init__(self, forward: Callable[[list[Item]], Awaitable[Sequence[Any]]],
                 combine: Callable[[list[Any]], Any], size: Callable[[Item], int] = len, *,
                 max_batch_tokens: int, max_wait_ms: float = 0.0, max_concurrent_batches: int = 1,
                 max_concurrent_requests: int | None = None, name: str | None = None):
        """`name`: the `batcher` tag of this batcher's batch-size metrics (none recorded without one)."""
        self.forward, self.combine, self.size = forward, combine, size
        self.tags = None if name is None else {"batcher": name}
        self.max_batch_tokens, self.max_wait_s = max_batch_tokens, max_wait_ms / 1000
        self.max_concurrent_batches, self.max_concurrent_requests = max_concurrent_batches, max_concurrent_requests
        self.requests = 0  # callers waiting for their result
        self._scheduler: asyncio.Task | None = None

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fresh state and scheduler on `loop` (a batcher used from a new event loop, as in-process tests do, must
        not touch the previous loop's futures)."""
        self._queue: deque[_Request] = deque()
        self._queued_tokens = 0
        self._in_flight = 0
        self._wake = asyncio.Event()  # an arrival or a finished batch: the scheduler looks again
        self._timer: asyncio.Handle | None = None  # uvloop returns a plain Handle for short delays
        self._scheduler = loop.create_task(self._schedule())
        queue = self._queue  # this scheduler's requests (a later `_start` makes a new queue)
        self._scheduler.add_done_callback(lambda scheduler: self._stopped(scheduler, queue))

    @classmethod
    def from_config(cls, forward, combine, config: BatchingConfig, size: Callable[[Item], int] = len,
                    name: str | None = None) -> TokenBatcher:
        return cls(forward, combine, size, **config.model_dump(), name=name)

    async def __call__(self, items: Sequence[Item]) -> Any:
        """`combine` of the forward's outputs for `items`, computed in batches shared with concurrent callers."""
        if not items:
            return self.combine([])
        if self.max_concurrent_requests is not None and self.requests >= self.max_concurrent_requests:
            raise Overloaded(f"{self.requests} requests are waiting for this service; retry shortly", retry_after=1)
        loop = asyncio.get_running_loop()
        if self._scheduler is None or self._scheduler.get_loop() is not loop or self._scheduler.done():
            self._start(loop)
        request = _Request(items, loop.create_future())
        self._queue.append(request)
        self._queued_tokens += sum(self.size(item) for item in items)
        self._wake.set()
        self.requests += 1
        try:
            return await request.future  # cancelling it (the caller went away) drops the items not yet taken
        finally:
            self.requests -= 1

    @staticmethod
    def _stopped(scheduler: asyncio.Task, queue: deque) -> None:
        """The scheduler ended (its loop is closing, or a bug): fail what waits instead of leaving it hanging."""
        error = RuntimeError("the request batcher stopped") if scheduler.cancelled() else scheduler.exception()
        for request in queue:
            if not request.future.done():
                request.future.set_exception(error)

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._drop_abandoned()
            while self._queue and self._in_flight < self.max_concurrent_batches:
                wait = self._wait_s()
                if wait > 0:
                    if self._timer is None:  # one pending wake-up is enough: the oldest item's deadline only grows
                        self._timer = loop.call_later(wait, self._timer_fired)
                    break
                batch = self._take()
                self._in_flight += 1
                loop.create_task(self._run(batch))

    def _timer_fired(self) -> None:
        self._timer = None  # cleared here, not judged by the clock: asyncio may run a timer slightly early
        self._wake.set()

    def _wait_s(self) -> float:
        """How long the next batch should still wait for more items (0: start it now)."""
        if self._in_flight == 0 or self._queued_tokens >= self.max_batch_tokens:
            return 0.0
        return self._queue[0].queued_at + self.max_wait_s - time.monotonic()

    def _drop_abandoned(self) -> None:
        for request in [r for r in self._queue if r.future.done()]:
            self._queue.remove(request)
            self._queued_tokens -= sum(self.size(item) for item in request.items[request.next:])

    def _take(self) -> list[tuple[_Request, int]]:
        """Items from the front of the queue up to `max_batch_tokens` (at least one)."""
        batch, tokens = [], 0
        while self._queue:
            request = self._queue[0]
            if request.future.done():
                self._drop_abandoned()
                continue
            size = self.size(request.items[request.next])
            if batch and tokens + size > self.max_batch_tokens:
                break
            batch.append((request, request.next))
            tokens += size
            self._queued_tokens -= size
            request.next += 1
            if request.next == len(request.items):
                self._queue.popleft()
        if self.tags is not None:
            BATCH_SEQUENCES.observe(len(batch), tags=self.tags)
            BATCH_TOKENS.observe(tokens, tags=self.tags)
        return batch

    async def _run(self, batch: list[tuple[_Request, int]]) -> None:
        try:
            outputs = await self.forward([request.items[i] for request, i in batch])
            for (request, i), output in zip(batch, outputs):
                request.outputs[i] = output
                request.missing -= 1
                if request.missing == 0 and not request.future.done():
                    request.future.set_result(self.combine(request.outputs))
        except BaseException as e:  # the requests in this batch fail with it; the others carry on
            for request, _ in batch:
                if not request.future.done():
                    request.future.set_exception(e)
            if not isinstance(e, Exception):
                raise
        finally:
            self._in_flight -= 1
            self._wake.set()


class BatchedHead:
    """A task head's forward for the services (``forward(sequences) -> head output``) with the sequences of
    concurrent calls packed into shared backbone forwards. `backbone(sequences)` returns (or awaits) the final hidden
    states of the sequences packed [tokens, hidden]; the head runs once per batch, in a worker thread."""

    def __init__(self, backbone: Callable[[list[list[int]]], Awaitable[torch.Tensor]], head: torch.nn.Module,
                 config: BatchingConfig, name: str | None = None):
        self.backbone, self.head = backbone, head
        self.pooled = isinstance(head, SequenceClassificationHead)  # one output row per sequence, not per token
        self.batcher = TokenBatcher.from_config(self.forward_batch, self._combine, config, name=name)

    def __call__(self, sequences: list[list[int]]) -> Awaitable[Any]:
        return self.batcher(sequences)

    async def forward_batch(self, sequences: list[list[int]]) -> list:
        """One backbone forward of a batch → the head's output for each sequence."""
        hidden = await self.backbone(sequences)
        return await asyncio.to_thread(self._run_head, hidden, sequences)

    @torch.inference_mode()
    def _run_head(self, hidden: torch.Tensor, sequences: list[list[int]]) -> list:
        if self.pooled:
            return list(self.head(hidden, sequences))  # [labels] per sequence
        lengths = [len(s) for s in sequences]
        output = self.head(hidden)
        if isinstance(output, tuple):  # QA: (start, end) logits, each [tokens]
            return list(zip(*(o.split(lengths) for o in output)))
        return list(output.split(lengths))  # tagging: [tokens, labels] per sequence

    def _combine(self, outputs: list):
        """One call's per-sequence outputs → the head output for its sequences packed, as a single forward gives."""
        if self.pooled:
            return torch.stack(outputs)
        if isinstance(outputs[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*outputs))
        return torch.cat(outputs)
