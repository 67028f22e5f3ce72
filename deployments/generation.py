"""The generation head service: the engine (scheduler, LM head, sampling) driving the stage deployments."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from seedoss.config import SeedOssConfig
from seedoss.engine import EngineConfig, LLMEngine, collect
from seedoss.loader import load_head
from seedoss.tokenizer import SeedOssTokenizer
from services.errors import from_exception
from services.generation import GenerateRequest, choice_dict, response_dict

from .metrics import GenerationMetrics
from .stage import ServePipeline

GAUGE_INTERVAL_S = 1.0


class Generation:
    def __init__(self, checkpoint: str, dtype: str, engine_config: dict, *stages):
        self.tokenizer = SeedOssTokenizer.from_pretrained(checkpoint)
        self.model_config = SeedOssConfig.from_pretrained(checkpoint)
        self.lm_head = load_head(checkpoint, "generate", dtype=dtype)
        self.engine_config = EngineConfig.model_validate(engine_config)
        self.stages = stages
        self.engine: LLMEngine | None = None
        self.metrics = GenerationMetrics()
        self._connecting = asyncio.Lock()
        self._gauges: asyncio.Task | None = None

    async def _engine(self) -> LLMEngine:
        async with self._connecting:
            if self.engine is None:
                pipeline = await ServePipeline.connect(list(self.stages))
                self.engine = LLMEngine(pipeline, self.lm_head, self.tokenizer, self.model_config, self.engine_config,
                                        observer=self.metrics)
                self._gauges = asyncio.get_running_loop().create_task(self._update_gauges())
        return self.engine

    async def _update_gauges(self) -> None:
        while True:
            s = self.engine.stats()
            self.metrics.update_gauges(s.num_running, s.num_waiting, s.kv_usage)
            await asyncio.sleep(GAUGE_INTERVAL_S)

    def _parse(self, body: dict) -> tuple[GenerateRequest, list[int]]:
        try:
            request = GenerateRequest.model_validate(body)
            return request, request.prompt_ids(self.tokenizer)
        except Exception as e:
            raise from_exception(e) from None

    async def stream(self, body: dict) -> AsyncIterator[dict]:
        """Chunks of new text/tokens per choice; the last carries `usage`. Errors surface before the first chunk."""
        request, ids = self._parse(body)
        engine = await self._engine()
        completion = 0
        try:
            async for out in engine.generate(ids, request.sampling_params()):
                completion += sum(len(o.token_ids) for o in out.outputs)
                chunk = {"id": out.request_id, "choices": [choice_dict(o) for o in out.outputs]}
                if out.finished:
                    chunk["usage"] = response_dict(out, completion)["usage"]
                yield chunk
        except Exception as e:
            raise from_exception(e) from None

    async def complete(self, body: dict) -> dict:
        request, ids = self._parse(body)
        engine = await self._engine()
        try:
            result = await collect(engine.generate(ids, request.sampling_params()))
        except Exception as e:
            raise from_exception(e) from None
        return response_dict(result, sum(len(o.token_ids) for o in result.outputs))

    async def stats(self) -> dict:
        s = (await self._engine()).stats()
        return {"num_running": s.num_running, "num_waiting": s.num_waiting, "kv_usage": s.kv_usage,
                "num_preemptions": s.num_preemptions, "generation_tokens": s.generation_tokens,
                "prompt_tokens": s.prompt_tokens, "requests_finished": s.requests_finished}

    async def max_model_len(self) -> int:
        return (await self._engine()).max_model_len

    async def ready(self) -> bool:
        await self._engine()
        return True
