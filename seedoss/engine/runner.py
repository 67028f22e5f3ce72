"""A micro-batch through the model: packed tokens through the pipeline of stages, then the LM head and the sampler
for the sequences whose step reached their last token."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor

import torch

from ..heads import LMHead
from ..sampling import Sampler, SamplingOutput, SamplingState
from .executor import Pipeline
from .scheduler import MicroBatch


class ModelRunner:
    def __init__(self, pipeline: Pipeline, lm_head: LMHead, sampler: Sampler, head_worker: Executor,
                 prefix_caching: bool):
        self.pipeline, self.lm_head, self.sampler, self.head_worker = pipeline, lm_head, sampler, head_worker
        self.prefix_caching = prefix_caching

    async def run(self, batch: MicroBatch) -> SamplingOutput | None:
        """Sampled tokens, one row per item with `samples` set (None when no item samples)."""
        items = batch.items
        tokens = torch.tensor([t for i in items for t in i.seq.token_slice(i.context, i.context + i.num_new)])
        q = [i.num_new for i in items]
        x = await self.pipeline.run(tokens, batch.seq_ids, q, [i.context for i in items],
                                    batch.block_hashes if self.prefix_caching else None)
        rows = [j for j, i in enumerate(items) if i.samples]
        if not rows:
            return None
        last = torch.cumsum(torch.tensor(q), 0) - 1
        hidden = x[last[rows]]
        states = [items[j].seq.sampling for j in rows]
        return await asyncio.get_running_loop().run_in_executor(self.head_worker, self._sample, hidden, states)

    @torch.inference_mode()
    def _sample(self, hidden: torch.Tensor, states: list[SamplingState]) -> SamplingOutput:
        return self.sampler(self.lm_head(hidden).float(), states)
