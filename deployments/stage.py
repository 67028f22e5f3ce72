"""One pipeline stage as a Serve deployment (`SeedOssStage0` … `SeedOssStage{N-1}`), and the engine's remote
pipeline over them.

A replica loads only its layers and keeps its own paged KV cache. Hidden states travel stage to stage by passing
each stage's DeploymentResponse straight into the next stage's call, so they never pass through the caller.
Cache-less forwards (classification, tagging, QA) use `prefill`, batched across callers with `@serve.batch`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import time

import ray
import torch
from ray import serve

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from seedoss.engine import LocalStageExecutor, StageUnavailable
from seedoss.kv_cache import MissingSequenceCache
from seedoss.loader import load_stage, parameter_bytes

from .wire import pack, unpack

log = logging.getLogger(__name__)

# What a stage call raises while a stage replica is dead, restarting or saturated: the step can be retried.
UNAVAILABLE_ERRORS = (RayActorError, ActorDiedError, ActorUnavailableError, BackPressureError,
                      DeploymentUnavailableError, ReplicaUnavailableError)


def stage_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means a stage replica was unavailable, also when Ray wrapped that: a RayTaskError whose cause
    it is, or the RayServeException Serve raises when a chained stage call's upstream replica died."""
    for _ in range(4):
        if isinstance(exc, UNAVAILABLE_ERRORS):
            return True
        nested = getattr(exc, "cause", None) if isinstance(exc, RayTaskError) else exc.__cause__
        if nested is None:
            return False
        exc = nested
    return False


def detached(fn, *args):
    """`fn(*args)` outside the current Serve request: handle calls made in it are not children of the request that
    happens to be current, so Serve does not cancel them when that client goes away. The engine's steps and frees
    serve every running sequence; its loop task was started inside the first request and inherits its context."""
    return contextvars.Context().run(fn, *args)


class SeedOssStage:
    def __init__(self, checkpoint: str, start: int, end: int, dtype: str, kv_budget_bytes: int, block_size: int,
                 device: str = "auto"):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"  # a replica given `num_gpus` sees its GPU
        stage = load_stage(checkpoint, start, end, dtype=dtype, device=device)
        self.executor = LocalStageExecutor(stage, kv_budget_bytes, block_size)
        self.start, self.end = start, end

    async def forward(self, inputs, seq_ids: list[str], query_lens: list[int], context_lens: list[int]):
        """A generation step with the KV cache (inputs: packed ids or the previous stage's hidden states)."""
        return pack(await self.executor.forward(unpack(inputs), seq_ids, query_lens, context_lens))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def prefill(self, inputs: list, lengths: list[list[int]]) -> list:
        """Cache-less forward of whole sequences; concurrent callers are packed into one forward."""
        tensors = [unpack(x) for x in inputs]
        flat = [n for lens in lengths for n in lens]
        hidden = await self.executor.forward(torch.cat(tensors), list(range(len(flat))), flat, [0] * len(flat),
                                             use_cache=False)
        sizes = [sum(lens) for lens in lengths]
        return [pack(h) for h in hidden.split(sizes)]

    def free(self, seq_ids: list[str]) -> None:
        self.executor.free(seq_ids)

    def info(self) -> dict:
        return {
            "start": self.start, "end": self.end, "num_blocks": self.executor.num_blocks,
            "device": str(self.executor.stage.device),
            "block_size": self.executor.block_size, "parameter_bytes": parameter_bytes(self.executor.stage),
            "node_id": ray.get_runtime_context().get_node_id(), "actor_name": ray.get_runtime_context().get_actor_name(),
            "pid": os.getpid(),
            **self.executor.cache_stats(),
        }

    def check_health(self) -> None:
        self.executor.cache_stats()  # the worker thread answers


class ServePipeline:
    """The engine's `Pipeline` over stage deployment handles.

    `run` reports an unavailable stage as `StageUnavailable` (the engine retries the step). `prefill` (cache-less,
    used by the task heads) retries by itself: a stage replica restart is ridden out with exponential backoff
    (`prefill_backoff_s` doubling up to `prefill_max_backoff_s`) for at most `prefill_retry_s` seconds, after which
    it raises `StageUnavailable` (503 / UNAVAILABLE to the client)."""

    def __init__(self, handles: list, num_blocks: int, block_size: int, *, prefill_retry_s: float = 120.0,
                 prefill_backoff_s: float = 0.5, prefill_max_backoff_s: float = 5.0):
        self.handles, self.num_blocks, self.block_size = handles, num_blocks, block_size
        self.head_executor = None
        self.num_stages = len(handles)
        self.prefill_retry_s, self.prefill_backoff_s = prefill_retry_s, prefill_backoff_s
        self.prefill_max_backoff_s = prefill_max_backoff_s

    @classmethod
    async def connect(cls, handles: list) -> "ServePipeline":
        infos = [await h.info.remote() for h in handles]
        return cls(handles, min(i["num_blocks"] for i in infos), infos[0]["block_size"])

    def _chain_forward(self, tokens, seq_ids, query_lens, context_lens):
        x = pack(tokens)
        for handle in self.handles:
            x = handle.forward.remote(x, seq_ids, query_lens, context_lens)
        return x

    async def run(self, tokens, seq_ids, query_lens, context_lens):
        x = detached(self._chain_forward, tokens, seq_ids, query_lens, context_lens)
        try:
            return unpack(await x)
        except MissingSequenceCache as e:  # Ray re-raises the replica's exception as a subclass of it
            raise MissingSequenceCache(getattr(e, "cause", e).seq_ids) from None
        except Exception as e:
            if stage_unavailable(e):
                raise StageUnavailable(f"{type(e).__name__}: {e}") from None
            raise

    async def prefill(self, sequences: list[list[int]]):
        lengths = [len(s) for s in sequences]
        tokens = pack(torch.tensor([t for s in sequences for t in s]))
        deadline = time.monotonic() + self.prefill_retry_s
        backoff, attempt = self.prefill_backoff_s, 0
        while True:
            x = tokens
            for handle in self.handles:
                x = handle.prefill.remote(x, lengths)
            try:
                return unpack(await x)
            except Exception as e:
                if not stage_unavailable(e):
                    raise
                attempt += 1
                if time.monotonic() + backoff > deadline:
                    raise StageUnavailable(f"{type(e).__name__} after {attempt} attempts: {e}") from None
                log.warning("stage unavailable during prefill (attempt %d, %s); retrying in %.1fs",
                            attempt, type(e).__name__, backoff)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, self.prefill_max_backoff_s)

    def _free(self, seq_ids):
        for handle in self.handles:
            handle.free.remote(list(seq_ids))

    def free(self, seq_ids):
        detached(self._free, seq_ids)  # also when called while a cancelled request unwinds (abort)
