"""The generation head service: the engine (scheduler, LM head, sampling) driving the stage deployments."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ray import serve

from seedoss.config import SeedOssConfig
from seedoss.engine import EngineConfig, LLMEngine, collect
from seedoss.loader import load_head
from seedoss.tokenizer import SeedOssTokenizer
from seedoss.services.defaults import apply_defaults, generation_defaults
from seedoss.services.errors import InvalidRequest, from_exception
from seedoss.services.generation import GenerateRequest, choice_dict, response_dict

from .autoscaling import LOAD_KV, LOAD_SEQUENCES
from .faults import RetryPolicy, Timeouts
from .metrics import GenerationMetrics
from .routing import ServePipeline, StageChain, wire_row_bytes
from .stream_channel import StreamSender
from .timing import STREAM_TIMING, now

GAUGE_INTERVAL_S = 1.0


def _rank(rank) -> int:
    return rank if isinstance(rank, int) else rank.rank  # a ReplicaRank


class Generation:
    """One lane's engine (see `deployments/routing.py`). Reports its load for the lane autoscaling policy
    (`deployments/autoscaling.py`) through `record_autoscaling_stats`."""

    def __init__(self, checkpoint: str, dtype: str, engine_config: dict, retry: dict, timeouts: dict, *stages,
                 generation_config: str = "auto", stage_transport: str = "direct"):
        self.tokenizer = SeedOssTokenizer.from_pretrained(checkpoint)
        self.defaults = generation_defaults(checkpoint, generation_config)  # for fields a request leaves unset
        self.model_config = SeedOssConfig.from_pretrained(checkpoint)
        self.lm_head = load_head(checkpoint, "generate", dtype=dtype)
        # Between replicas the pipeline retries under the app's policy; the engine must not retry on top of it.
        self.engine_config = EngineConfig.model_validate({**engine_config, "max_step_retries": 0})
        self.chain = StageChain(stages, RetryPolicy.model_validate(retry), Timeouts.model_validate(timeouts).stage_s,
                                row_bytes=wire_row_bytes(self.model_config, dtype))
        self.lane = _rank(serve.get_replica_context().rank)
        self.direct = stage_transport == "direct"  # steps over the lane's own connections (step_channel.py)
        self.engine: LLMEngine | None = None
        self.metrics = GenerationMetrics()
        self.links = StreamSender()  # to the gateway replicas that relay this lane's streams (`relay`)
        self.relayed = 0  # streams whose chunks went over those connections
        self._connecting = asyncio.Lock()
        self._gauges: asyncio.Task | None = None

    def reconfigure(self, user_config, rank) -> None:
        """Serve tells a replica its rank (contiguous 0..N-1) here, also when ranks are reassigned after a
        scale-in: the rank is this replica's lane."""
        self.lane = _rank(rank)
        if self.engine is not None:
            self.engine.pipeline.set_lane(self.lane)

    async def _engine(self) -> LLMEngine:
        async with self._connecting:
            if self.engine is None:
                pipeline = await ServePipeline.connect(self.chain, self.lane, self.direct)
                self.engine = LLMEngine(pipeline, self.lm_head, self.tokenizer, self.model_config, self.engine_config,
                                        observer=self.metrics)
                self._gauges = asyncio.get_running_loop().create_task(self._update_gauges())
        return self.engine

    async def _update_gauges(self) -> None:
        while True:
            s = self.engine.stats()
            self.metrics.update_gauges(s.num_running, s.num_waiting, s.kv_usage)
            await asyncio.sleep(GAUGE_INTERVAL_S)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """This lane's load, for `lane_autoscaling_policy`: sequences running or waiting, and KV cache usage."""
        if self.engine is None:
            return {LOAD_SEQUENCES: 0.0, LOAD_KV: 0.0}
        s = self.engine.stats()
        return {LOAD_SEQUENCES: float(s.num_running + s.num_waiting), LOAD_KV: s.kv_usage}

    def _parse(self, body: dict) -> tuple[GenerateRequest, list[int]]:
        try:
            request = GenerateRequest.model_validate(apply_defaults(body, self.defaults))
        except Exception as e:
            raise from_exception(e) from None
        if request.prompt_token_ids is None:  # text is tokenized only by the gateway core, off any event loop
            raise InvalidRequest("prompt: the Generation deployment takes prompt_token_ids (the gateway tokenizes)",
                                 param="prompt")
        return request, list(request.prompt_token_ids)

    async def stream(self, body: dict, resume: dict | None = None) -> AsyncIterator[dict]:
        """Chunks of new text/tokens per choice; the last carries `usage`. Errors surface before the first chunk.

        `resume` (from `GenerationStream`, never from a client) continues a stream that a lost lane started:
        `{"id": the stream's id, "choices": {index: {"token_ids": delivered, "finished": bool}}}`."""
        started = now()
        request, ids = self._parse(body)
        engine = await self._engine()
        choices = (resume or {}).get("choices", {})
        completion = sum(len(c["token_ids"]) for c in choices.values())
        try:
            async for out in engine.generate(ids, request.sampling_params(), request_id=(resume or {}).get("id"),
                                             resume={int(i): None if c["finished"] else c["token_ids"]
                                                     for i, c in choices.items()}, cache_salt=request.cache_salt):
                completion += sum(len(o.token_ids) for o in out.outputs)
                chunk = {"id": out.request_id, "choices": [choice_dict(o) for o in out.outputs]}
                if out.finished:
                    chunk["usage"] = response_dict(out, completion)["usage"]
                if STREAM_TIMING:
                    chunk["timing"] = {"generation_start": started, "generation": now()}
                yield chunk
        except Exception as e:
            raise from_exception(e) from None

    async def relay(self, body: dict, resume: dict | None, to: dict) -> int:
        """`stream(body, resume)` with its chunks sent over this replica's connection to the gateway replica that
        `to` names (its receiver's address and token, and the stream's key; deployments/stream_channel.py), not as
        Serve stream items. Returns the number of chunks sent once all are written; errors are raised as `stream`
        raises them."""
        link = await self.links.link(to)
        self.relayed += 1
        sent, key = 0, to["key"]
        async for chunk in self.stream(body, resume):
            link.send(key, chunk)
            sent += 1
            await link.drain()
        await link.flush()
        return sent

    async def complete(self, body: dict) -> dict:
        request, ids = self._parse(body)
        engine = await self._engine()
        try:
            result = await collect(engine.generate(ids, request.sampling_params(), cache_salt=request.cache_salt))
        except Exception as e:
            raise from_exception(e) from None
        return response_dict(result, sum(len(o.token_ids) for o in result.outputs))

    async def stats(self) -> dict:
        s = (await self._engine()).stats()
        return {"num_running": s.num_running, "num_waiting": s.num_waiting, "kv_usage": s.kv_usage,
                "num_preemptions": s.num_preemptions, "generation_tokens": s.generation_tokens,
                "prompt_tokens": s.prompt_tokens, "requests_finished": s.requests_finished, "batches": s.batches,
                "steps": s.steps,
                "cache_misses": s.cache_misses, "prefix_cache_queries": s.prefix_cache_queries,
                "prefix_cache_hits": s.prefix_cache_hits, "lane": self.lane, "relayed_streams": self.relayed,
                **self._pipeline(), "replica": serve.get_replica_context().replica_id.unique_id}

    def _pipeline(self) -> dict:
        """How the steps went: where their time went, per component (deployments/timing.py: hops, queues,
        compute), and how they reached the stages (`stage_transport`, as configured unless given up for now)."""
        pipeline = self.engine.pipeline
        return {"timing": pipeline.timings.as_dict(), "stage_transport": "direct" if pipeline.direct else "serve"}

    async def max_model_len(self) -> int:
        return (await self._engine()).max_model_len

    async def ready(self) -> bool:
        await self._engine()
        return True
