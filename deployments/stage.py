"""One pipeline stage as a Serve deployment (`SeedOssStage0` … `SeedOssStage{N-1}`).

A replica loads only its layers and keeps its own paged KV cache, shared by the lanes routed to it (sequence ids are
globally unique, see `deployments/routing.py`). Cache-less forwards (classification, tagging, QA) use `prefill`:
calls arriving while a forward runs are packed into the next one, up to `max_batch_tokens` (`TokenBatcher`; no
waiting: a head already batches its own requests, this only merges batches of different heads and head replicas).
A lane's generation steps come as Serve calls (`forward`) or, with `stage_transport: direct`, over the lane's own
connection to the replica's step server (`channel()`, deployments/step_channel.py); both run the same `_step`.
The heads' cache-less forwards come the same two ways (`prefill`, or the step server), into the same batcher.
"""

from __future__ import annotations

import functools
import os

import ray
import torch

from seedoss.engine import LocalStageExecutor
from seedoss.engine.errors import MissingSequenceCache
from seedoss.loader import load_stage, parameter_bytes

from .batching import TokenBatcher
from .step_channel import StepServer
from .timing import StageStamps, now
from .wire import pack, stamps, unpack


# A step with this many new tokens is a prompt (or a chunk of one): compute-bound, so more threads shorten it (a
# 64-token prompt through 6 layers of the small preset: 70 → 43 ms with 2 threads on 2 cores); a decode step reads
# weights and gains nothing from a second thread on our 2-core boxes (bench/RESULTS.md).
PROMPT_STEP_TOKENS = 16


class SeedOssStage:
    def __init__(self, checkpoint: str, start: int, end: int, dtype: str, kv_budget_bytes: int, block_size: int,
                 device: str = "auto", forward_timeout_s: float = 60.0, max_batch_tokens: int = 16384,
                 threads: int | None = None, prompt_threads: int | None = None):
        """`prompt_threads`: torch threads for a step of at least PROMPT_STEP_TOKENS new tokens that its lane sent
        with no other step in flight (`AppConfig.stage_prompt_threads`)."""
        if threads:  # else Ray's OMP_NUM_THREADS from this replica's num_cpus (1 for a fraction), read by torch
            torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"  # a replica given `num_gpus` sees its GPU
        # loaded on the executor's thread, which runs all of this replica's math (one OpenMP team per process)
        self.executor = LocalStageExecutor(functools.partial(load_stage, checkpoint, start, end, dtype=dtype,
                                                             device=device), kv_budget_bytes, block_size)
        self.start, self.end = start, end
        self.prompt_threads = prompt_threads if prompt_threads and prompt_threads > torch.get_num_threads() else None
        self.forward_timeout_s = forward_timeout_s
        self.prefill_batcher = TokenBatcher(self._prefill_batch, torch.cat, max_batch_tokens=max_batch_tokens,
                                           name=f"stage{start}-{end - 1}")
        self.step_server: StepServer | None = None  # started by the first `channel()` call

    async def forward(self, inputs, seq_ids: list[str], query_lens: list[int], context_lens: list[int],
                      block_hashes: list[tuple[int, list[bytes]]] | None = None):
        """A generation step with the KV cache (inputs: packed ids or the previous stage's hidden states;
        `block_hashes`: the engine's prefix-cache names of the blocks, see `StepBatch`). The output carries the
        step's stage stamps with this stage's appended (deployments/timing.py)."""
        entered = now()
        y, marks = await self._step(unpack(inputs), seq_ids, query_lens, context_lens, block_hashes, entered)
        wire = pack(y)
        return (*wire, (*stamps(inputs), StageStamps(*marks, now())))

    async def _step(self, x: torch.Tensor, seq_ids, query_lens, context_lens, block_hashes=None,
                    entered: float | None = None, alone: bool = False) -> tuple[torch.Tensor, tuple[float, ...]]:
        """The step's outputs and its first four stamps (entered, unpacked, started, ended). `alone`: its lane has
        no other step in flight (at low load the other stages idle meanwhile: a prompt may use their cores)."""
        unpacked, clock = now(), []
        threads = self.prompt_threads if alone and sum(query_lens) >= PROMPT_STEP_TOKENS else None
        y = await self.executor.forward(x, seq_ids, query_lens, context_lens, block_hashes=block_hashes, clock=clock,
                                        threads=threads)
        return y, (entered or unpacked, unpacked, clock[0], clock[1])

    async def _channel_step(self, x: torch.Tensor, *step, alone: bool = False) -> tuple[torch.Tensor, StageStamps]:
        y, marks = await self._step(x, *step, alone=alone)
        return y, StageStamps(*marks, now())

    async def _channel_prefill(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        return await self.prefill_batcher(x.split(lengths))

    async def channel(self) -> dict:
        """Where this replica takes generation steps and the heads' forwards directly (deployments/step_channel.py):
        its node's address, a port, the token a client must show, and the replica's name."""
        if self.step_server is None:
            self.step_server = StepServer(self._channel_step, self._channel_prefill, MissingSequenceCache)
        address = await self.step_server.address(ray.util.get_node_ip_address())
        return {**address, "replica": ray.get_runtime_context().get_actor_name()}

    async def prefill(self, inputs, lengths: list[int]):
        """Cache-less forward of whole sequences (inputs: their packed ids or hidden states, `lengths` each)."""
        return pack(await self.prefill_batcher(unpack(inputs).split(lengths)))

    async def _prefill_batch(self, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
        lengths = [len(s) for s in sequences]
        hidden = await self.executor.forward(sequences, list(range(len(lengths))), lengths, [0] * len(lengths),
                                             use_cache=False)
        return list(hidden.split(lengths))

    async def free(self, seq_ids: list[str]) -> None:
        """Async: Serve runs sync methods in a thread pool, a thread hop per call; this only queues the free on the
        worker thread, behind the forwards already queued."""
        self.executor.free(seq_ids)

    def info(self) -> dict:
        return {
            "start": self.start, "end": self.end, "num_blocks": self.executor.num_blocks,
            "device": str(self.executor.stage.device),
            "block_size": self.executor.block_size, "parameter_bytes": parameter_bytes(self.executor.stage),
            "node_id": ray.get_runtime_context().get_node_id(), "actor_name": ray.get_runtime_context().get_actor_name(),
            "pid": os.getpid(), "torch_threads": torch.get_num_threads(),
            "direct": self.step_server.served if self.step_server else {},  # calls answered over step connections
            **self.executor.cache_stats(),
        }

    def check_health(self) -> None:
        """Answers at once (never queued behind a forward); unhealthy when one forward has run past the stage
        timeout — a hung replica, which Serve then replaces."""
        busy = self.executor.busy_for()
        if busy > self.forward_timeout_s:
            raise RuntimeError(f"stage {self.start}-{self.end} has been running one forward for {busy:.0f}s")
