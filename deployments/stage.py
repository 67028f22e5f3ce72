"""One pipeline stage as a Serve deployment (`SeedOssStage0` … `SeedOssStage{N-1}`).

A replica loads only its layers and keeps its own paged KV cache, shared by the lanes routed to it (sequence ids are
globally unique, see `deployments/routing.py`). Cache-less forwards (classification, tagging, QA) use `prefill`,
batched across callers with `@serve.batch`.
"""

from __future__ import annotations

import os

import ray
import torch
from ray import serve

from seedoss.engine import LocalStageExecutor
from seedoss.loader import load_stage, parameter_bytes

from .wire import pack, unpack


class SeedOssStage:
    def __init__(self, checkpoint: str, start: int, end: int, dtype: str, kv_budget_bytes: int, block_size: int,
                 device: str = "auto", forward_timeout_s: float = 60.0):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"  # a replica given `num_gpus` sees its GPU
        stage = load_stage(checkpoint, start, end, dtype=dtype, device=device)
        self.executor = LocalStageExecutor(stage, kv_budget_bytes, block_size)
        self.start, self.end = start, end
        self.forward_timeout_s = forward_timeout_s

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
        """Answers at once (never queued behind a forward); unhealthy when one forward has run past the stage
        timeout — a hung replica, which Serve then replaces."""
        busy = self.executor.busy_for()
        if busy > self.forward_timeout_s:
            raise RuntimeError(f"stage {self.start}-{self.end} has been running one forward for {busy:.0f}s")
