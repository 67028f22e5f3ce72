"""One pipeline stage as a Serve deployment (`SeedOssStage0` … `SeedOssStage{N-1}`), and the engine's remote
pipeline over them.

A replica loads only its layers and keeps its own paged KV cache. Hidden states travel stage to stage by passing
each stage's DeploymentResponse straight into the next stage's call, so they never pass through the caller.
Cache-less forwards (classification, tagging, QA) use `prefill`, batched across callers with `@serve.batch`.
"""

from __future__ import annotations

import ray
import torch
from ray import serve

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from seedoss.engine import LocalStageExecutor, StageUnavailable
from seedoss.kv_cache import MissingSequenceCache
from seedoss.loader import load_stage, parameter_bytes

from .wire import pack, unpack


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
            **self.executor.cache_stats(),
        }

    def check_health(self) -> None:
        self.executor.cache_stats()  # the worker thread answers


class ServePipeline:
    """The engine's `Pipeline` over stage deployment handles."""

    def __init__(self, handles: list, num_blocks: int, block_size: int):
        self.handles, self.num_blocks, self.block_size = handles, num_blocks, block_size
        self.num_stages = len(handles)

    @classmethod
    async def connect(cls, handles: list) -> "ServePipeline":
        infos = [await h.info.remote() for h in handles]
        return cls(handles, min(i["num_blocks"] for i in infos), infos[0]["block_size"])

    async def run(self, tokens, seq_ids, query_lens, context_lens):
        x = pack(tokens)
        for handle in self.handles:
            x = handle.forward.remote(x, seq_ids, query_lens, context_lens)
        try:
            return unpack(await x)
        except MissingSequenceCache as e:  # Ray re-raises the replica's exception as a subclass of it
            raise MissingSequenceCache(getattr(e, "cause", e).seq_ids) from None
        except (RayActorError, ActorDiedError, ActorUnavailableError, BackPressureError, DeploymentUnavailableError,
                ReplicaUnavailableError) as e:
            raise StageUnavailable(f"{type(e).__name__}: {e}") from None

    async def prefill(self, sequences: list[list[int]]):
        lengths = [len(s) for s in sequences]
        x = pack(torch.tensor([t for s in sequences for t in s]))
        for handle in self.handles:
            x = handle.prefill.remote(x, lengths)
        return unpack(await x)

    def free(self, seq_ids):
        for handle in self.handles:
            handle.free.remote(list(seq_ids))
