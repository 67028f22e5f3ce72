"""The generation engine: admission, the loop, and what a finished micro-batch means for its requests.

One asyncio loop keeps up to `pipeline.micro_batches` micro-batches in flight (one per stage when each stage
computes on its own, each then working on a different one): the scheduler picks a micro-batch
(seedoss/engine/scheduler.py), the runner takes it through the stages, LM head and sampler (runner.py), and
`_process` applies the result — new tokens to their sequences (sequence.py decides when one stops), deltas to the
requests' streams (outputs.py), and the failure policy.
Correctness never depends on cache affinity: a stage that lacks a sequence's context raises, and the sequence
is recomputed.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import gc
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import SeedOssConfig
from ..detokenizer import IncrementalDetokenizer, StopStringMatcher
from ..heads import LMHead
from ..sampling import Sampler, SamplingParams, SamplingState
from ..structured import constraint_for
from ..tokenizer import SeedOssTokenizer
from .block_manager import BlockManager
from .config import EngineConfig
from .errors import KVCacheFull, MissingSequenceCache, RequestError, StageUnavailable
from .executor import LocalPipeline, LocalStageExecutor, Pipeline
from .outputs import CompletionOutput, EngineObserver, EngineStats, RequestOutput
from .runner import ModelRunner
from .scheduler import MicroBatch, Scheduler
from .sequence import Sequence, Status, TokenLogprob

log = logging.getLogger(__name__)


@dataclass
class _Request:
    key: str  # engine-internal and globally unique: sequences' cache keys derive from it, never from request_id
    request_id: str
    prompt_ids: list[int]
    seqs: list[Sequence]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens the prefix cache supplied (to the first choice admitted; forks share its prompt)."""
        return next((s.num_cached_tokens for s in self.seqs if s.num_cached_tokens is not None), 0)


def admit(prompt_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> SamplingParams:
    """A request's admission checks, shared by every generation backend so they answer alike: a non-empty prompt of
    ids inside the vocabulary, room for one generated token, and `max_tokens` within the context (filled in with
    all the room left when None)."""
    if not prompt_ids:
        raise RequestError("the prompt is empty", "prompt")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})", "prompt")
    room = max_model_len - len(prompt_ids)
    if room < 1:
        raise RequestError(f"the prompt has {len(prompt_ids)} tokens; this model accepts at most "
                           f"{max_model_len - 1} so one can be generated", "prompt")
    if params.max_tokens is None:
        return params.model_copy(update={"max_tokens": room})
    if params.max_tokens > room:
        raise RequestError(f"max_tokens={params.max_tokens} exceeds the {room} tokens left after the "
                           f"{len(prompt_ids)}-token prompt (context {max_model_len})", "max_tokens")
    return params

class LLMEngine:
    def __init__(self, pipeline: Pipeline, lm_head: LMHead, tokenizer: SeedOssTokenizer,
                 model_config: SeedOssConfig, config: EngineConfig | None = None, seed: int | None = None,
                 observer: EngineObserver | None = None):
        self.observer = observer or EngineObserver()
        self.pipeline, self.lm_head, self.tokenizer, self.model_config = pipeline, lm_head, tokenizer, model_config
        self.config = config or EngineConfig()
        num_blocks, block_size = pipeline.num_blocks, pipeline.block_size
        caching = self.config.enable_prefix_caching
        self.scheduler = Scheduler(BlockManager(num_blocks, block_size, caching), max_num_seqs=self.config.max_num_seqs,
                                   max_batched_tokens=self.config.max_batched_tokens)
        self.max_model_len = min(self.config.max_model_len or model_config.max_position_embeddings,
                                 model_config.max_position_embeddings, num_blocks * block_size)
        sampler = Sampler(torch.Generator().manual_seed(seed if seed is not None else random.randrange(2**63)))
        head_worker = pipeline.head_executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="lm-head")
        self.runner = ModelRunner(pipeline, lm_head, sampler, head_worker, caching)
        self._requests: dict[str, _Request] = {}  # by key
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._totals = {"prompt_tokens": 0, "generation_tokens": 0, "requests_finished": 0, "batches": 0,
                        "steps": 0, "cache_misses": 0}
        self._ttft: deque[float] = deque(maxlen=2048)
        self._itl: deque[float] = deque(maxlen=8192)
        # What exists now (weights, tokenizer, configs) lives as long as the engine: move it out of the cyclic
        # GC's reach so the collections that each step's garbage triggers stay short (vLLM does the same).
        gc.freeze()

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, num_stages: int = 1, layers_per_stage: list[int] | None = None,
                        dtype: str = "float32", config: EngineConfig | None = None, seed: int | None = None) -> "LLMEngine":
        """An in-process engine whose stages run in worker threads of this process."""
        from ..loader import load_head, load_stage
        from ..partition import partition_layers

        model_config = SeedOssConfig.from_pretrained(path)
        config = config or EngineConfig()
        ranges = partition_layers(model_config, None if layers_per_stage else num_stages, layers_per_stage)
        # One thread loads and runs every stage and the LM head: the stages are on the CPU, where each thread that
        # runs parallel ops holds an OpenMP team of all the cores, and two teams throttle each other (see
        # LocalStageExecutor): with a thread per stage the 2-stage small preset decoded at 49% of the bandwidth
        # roofline against 68% for one stage (bench/RESULTS.md).
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stages")
        pipeline = LocalPipeline([LocalStageExecutor(functools.partial(load_stage, path, s, e, dtype=dtype),
                                                     config.kv_budget_bytes, config.block_size, worker)
                                  for s, e in ranges])
        head = pipeline.head_executor.submit(load_head, path, "generate", dtype=dtype).result()
        return cls(pipeline, head, SeedOssTokenizer.from_pretrained(path), model_config, config, seed)

    # --- public API --------------------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       resume: dict[int, list[int] | None] | None = None,
                       cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs (deltas); the last one has `finished=True`. Closing the iterator early
        (client gone) aborts the request.

        `request_id` is only the id outputs carry (any string; the engine keys its state by an id of its own).
        `resume` continues a request another engine started and lost (a lane that died or drained): per choice
        index, the token ids already delivered (generation goes on after them, and the outputs carry only new
        tokens and text), or None for a choice that already finished (it is not generated again).
        `cache_salt` (vLLM's field): only requests with the same salt share prefix-cache blocks."""
        request = self._add(prompt_ids, params, request_id, resume or {}, cache_salt)
        try:
            while True:
                item = await request.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if request.key in self._requests:
                self._abort(request)

    def _abort(self, request: _Request) -> None:
        """Stop a request now; its sequences' KV cache is dropped in every stage."""
        for seq in request.seqs:
            if not seq.finished:
                seq.finish("abort")
                if seq.seq_id not in self.scheduler.in_flight:
                    self._release(seq)
        self._publish(request)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_usage=self.scheduler.kv_usage, num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=self.scheduler.prefix_queries, prefix_cache_hits=self.scheduler.prefix_hits,
            ttft_s=list(self._ttft), inter_token_s=list(self._itl), **self._totals,
        )

    async def shutdown(self) -> None:
        if self._loop_task:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        for request in list(self._requests.values()):
            self._abort(request)

    # --- admission ---------------------------------------------------------------------------------------
    def _add(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None,
             resume: dict[int, list[int] | None], cache_salt: str | None) -> _Request:
        key = uuid.uuid4().hex
        request_id = request_id or f"req-{key}"
        params = admit(prompt_ids, params, self.model_config.vocab_size, self.max_model_len)
        seqs = [self._new_sequence(key, i, prompt_ids, params, resume.get(i, []), cache_salt)
                for i in range(params.n) if resume.get(i, []) is not None]
        request = _Request(key, request_id, list(prompt_ids), seqs)
        self._requests[key] = request
        if not seqs:  # a resumed request whose choices all finished: only its end is left to report
            self._publish(request)
            return request
        for seq in seqs:
            self.scheduler.add(seq)
        self._totals["prompt_tokens"] += len(prompt_ids)
        self.observer.on_prompt(len(prompt_ids))
        loop = asyncio.get_running_loop()
        if self._loop_task is None or self._loop_task.done() or self._loop_task.get_loop() is not loop:
            # (re)start the scheduling loop on the caller's event loop; an Event belongs to one loop
            self._wakeup = asyncio.Event()
            # a fresh context: the loop outlives the request that started it (Serve would cancel its children)
            self._loop_task = loop.create_task(self._loop(), context=contextvars.Context())
        self._wakeup.set()
        return request

    def _new_sequence(self, key: str, index: int, prompt_ids: list[int], params: SamplingParams,
                      delivered: list[int], cache_salt: str | None) -> Sequence:
        vocab = self.model_config.vocab_size
        seq = Sequence(
            seq_id=f"{key}:{index}", request_key=key, index=index, prompt_ids=list(prompt_ids), params=params,
            sampling=SamplingState(params, prompt_ids, self.model_config.eos_token_ids, vocab, fork_index=index,
                                   constraint=constraint_for(params, self.tokenizer)),
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens),
            stop_matcher=StopStringMatcher(params.stop, params.include_stop_str_in_output), cache_salt=cache_salt,
        )
        if delivered:
            if len(delivered) >= params.max_tokens or any(not 0 <= t < vocab for t in delivered):
                raise RequestError(f"cannot resume choice {index} after {len(delivered)} tokens", "resume")
            # Replay what the client already has: the same penalties, seeded draws, detokenizer and stop-string
            # state as the engine that produced it; the text it yields was delivered, so it is dropped.
            for token in delivered:
                seq.output_ids.append(token)
                seq.sampling.append(token)
                seq.stop_matcher.feed(seq.detokenizer.add(token))
            seq.sampling.skip_draws(len(delivered))
            seq.last_token_time = time.monotonic()  # not a first token: no TTFT sample for the new lane
        return seq

    # --- the loop ----------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        in_flight: dict[asyncio.Task, MicroBatch] = {}
        while True:
            while len(in_flight) < self.pipeline.micro_batches:
                queries, hits = self.scheduler.prefix_queries, self.scheduler.prefix_hits
                batch, preempted = self.scheduler.schedule(self.pipeline.micro_batches - len(in_flight))
                if self.scheduler.prefix_queries > queries:
                    self.observer.on_prefix_cache(self.scheduler.prefix_queries - queries,
                                                  self.scheduler.prefix_hits - hits)
                self._free_in_stages([s.seq_id for s in preempted])
                if batch is None:
                    break
                in_flight[asyncio.create_task(self._run(batch))] = batch
            self._wakeup.clear()
            waker = asyncio.create_task(self._wakeup.wait())
            done, _ = await asyncio.wait([*in_flight, waker], return_when=asyncio.FIRST_COMPLETED)
            waker.cancel()
            for task in done:
                if task is not waker:
                    self._process(in_flight.pop(task), task)
            # let the streams' consumers run now: their Python work would otherwise overlap the next step and
            # take cores from the stage's OpenMP threads, which then wait on each other at every barrier
            await asyncio.sleep(0)

    async def _run(self, batch: MicroBatch):
        try:
            return await self.runner.run(batch)
        except StageUnavailable:
            await asyncio.sleep(self.config.retry_backoff_s)  # back off while holding this pipeline slot
            raise

    def _process(self, batch: MicroBatch, task: asyncio.Task) -> None:
        error = StageUnavailable("the step was cancelled") if task.cancelled() else task.exception()
        self.scheduler.complete(batch, succeeded=error is None)
        misses = len(error.seq_ids) if isinstance(error, MissingSequenceCache) else 0
        self._totals["batches"] += 1
        self._totals["steps"] += len(batch.items)
        self._totals["cache_misses"] += misses
        self.observer.on_step(len(batch.items), misses)
        if isinstance(error, MissingSequenceCache):
            log.info("stage lost the cache of %s; recomputing", error.seq_ids)
            for item in batch.items:
                if item.seq.seq_id in error.seq_ids:
                    self.scheduler.reset(item.seq)
        elif isinstance(error, KVCacheFull):
            log.warning("a stage ran out of KV blocks the scheduler expected free; retrying: %s", error)
        elif isinstance(error, StageUnavailable) and max(i.seq.retries for i in batch.items) < self.config.max_step_retries:
            log.warning("stage unavailable (%s); retrying the step", error)
            for item in batch.items:
                item.seq.retries += 1
        elif error is not None:
            if not isinstance(error, StageUnavailable):
                log.error("micro-batch failed", exc_info=error)
            failure = error if isinstance(error, StageUnavailable) else RuntimeError(f"generation failed: {error}")
            for key in {i.seq.request_key for i in batch.items}:
                request = self._requests.pop(key, None)
                if request:
                    for seq in request.seqs:
                        if not seq.finished:
                            seq.finish("abort")
                        self._release(seq)
                    request.queue.put_nowait(failure)
        touched = {}
        sampled = None if error else task.result()
        rows = iter(range(len(batch.items)))
        for item in batch.items:
            seq = item.seq
            if item.samples and sampled is not None:
                row = next(rows)
                if not seq.finished:
                    self._accept(seq, sampled.token_ids[row], sampled.logprobs[row], sampled.top_logprobs[row])
            if seq.finished:
                self._release(seq)
            if seq.request_key in self._requests:
                touched[seq.request_key] = self._requests[seq.request_key]
        for request in touched.values():
            self._publish(request)

    def _accept(self, seq: Sequence, token: int, logprob: float, top: list[tuple[int, float]] | None) -> None:
        now = time.monotonic()
        if seq.last_token_time is None:
            self._ttft.append(now - seq.arrival_time)
            self.observer.on_first_token(now - seq.arrival_time)
        else:
            self._itl.append(now - seq.last_token_time)
            self.observer.on_next_token(now - seq.last_token_time)
        seq.last_token_time = now
        self._totals["generation_tokens"] += 1
        if seq.params.logprobs is not None:
            seq.pending_logprobs.append(TokenLogprob(token, logprob, top))
        seq.append_token(token, self.model_config.eos_token_ids, self.max_model_len)

    def _release(self, seq: Sequence) -> None:
        if seq.status is not Status.FINISHED:
            return
        if seq in self.scheduler.running or seq in self.scheduler.waiting:
            self.scheduler.remove(seq)
            self._free_in_stages([seq.seq_id])

    def _free_in_stages(self, seq_ids: list[str]) -> None:
        if seq_ids:
            self.pipeline.free(seq_ids)

    def _publish(self, request: _Request) -> None:
        outputs = []
        for seq in request.seqs:
            text, ids, logprobs = seq.take_pending()
            if text or ids or seq.finished:
                outputs.append(CompletionOutput(seq.index, text, ids, logprobs if seq.params.logprobs is not None else None,
                                                seq.finish_reason, seq.stop_reason))
        finished = all(s.finished for s in request.seqs)
        if finished:
            self._requests.pop(request.key, None)
            self._totals["requests_finished"] += 1
        if outputs or finished:
            request.queue.put_nowait(RequestOutput(request.request_id, request.prompt_ids, outputs, finished,
                                                   request.num_cached_tokens))

