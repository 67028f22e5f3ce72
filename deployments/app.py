"""The Serve application builder: `serve run seedoss.deployments.app:build_app checkpoint=DIR num_stages=2`, or the
`import_path` of a Serve config (`deployments/serve_config.yaml`)."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from seedoss.config import SeedOssConfig
from seedoss.partition import partition_layers

from .config import TASK_DEPLOYMENTS, AppConfig
from .gateway import Gateway
from .generation import Generation
from .heads import TaskHead
from .stage import SeedOssStage


def build_app(args: dict[str, Any] | AppConfig) -> Application:
    cfg = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    model_config = SeedOssConfig.from_pretrained(cfg.checkpoint)
    ranges = partition_layers(model_config, None if cfg.layers_per_stage else cfg.num_stages, cfg.layers_per_stage)
    # A stage runs the heads' cache-less forwards in chunks of at most the engine's micro-batch, each queued behind
    # the decode steps already waiting on its worker: a large classify/tag/QA request holds a generation stream up
    # for at most one chunk per stage (tests/test_fair_stage_time.py), never for its whole forward.
    prefill_chunk = min(cfg.batching.max_batch_tokens, cfg.engine.max_batched_tokens)
    stages = [] if not cfg.deploys_stages() else [
        serve.deployment(SeedOssStage, name=f"SeedOssStage{k}").options(**cfg.stage_options(k))
        .bind(cfg.checkpoint, start, end, cfg.dtype, cfg.engine.kv_budget_bytes, cfg.engine.block_size, cfg.device,
              cfg.timeouts.stage_s, prefill_chunk, cfg.stage_threads, cfg.stage_prompt_threads)
        for k, (start, end) in enumerate(ranges)
    ]
    retry, timeouts = cfg.retry.model_dump(), cfg.timeouts.model_dump()
    if cfg.generation.backend == "vllm":  # vLLM's AsyncLLM runs the whole pipeline; the stages serve only the heads
        from .vllm_backend import VllmGeneration

        generation = (serve.deployment(VllmGeneration, name="Generation").options(**cfg.generation_options())
                      .bind(cfg.checkpoint, cfg.dtype, [end - start for start, end in ranges], cfg.engine.model_dump(),
                            cfg.generation.vllm_options().model_dump(), cfg.device,
                            generation_config=cfg.generation_config))
    else:
        generation = (serve.deployment(Generation, name="Generation").options(**cfg.generation_options())
                      .bind(cfg.checkpoint, cfg.dtype, cfg.engine.model_dump(), retry, timeouts, *stages,
                            generation_config=cfg.generation_config, stage_transport=cfg.stage_transport))
    head_args = (cfg.dtype, retry, timeouts, cfg.batching.model_dump(), *stages)
    if cfg.head_placement == "gateway":  # each gateway replica builds the heads itself (`Gateway.__init__`)
        heads, local_heads = {}, {task: (path, *head_args) for task, path in cfg.heads().items()}
    else:
        heads, local_heads = {
            task: serve.deployment(TaskHead, name=TASK_DEPLOYMENTS[task]).options(**cfg.head_options(task))
            .bind(task, path, *head_args, limits=cfg.limits, stage_transport=cfg.stage_transport)
            for task, path in cfg.heads().items()
        }, {}
    return Gateway.options(**cfg.gateway_options()).bind(
        cfg.checkpoint, cfg.model_name, generation, **heads, local_heads=local_heads, api_keys=cfg.api_keys,
        limits=cfg.limits, require_api_keys=cfg.require_api_keys, retry=retry, timeouts=timeouts,
        tokenizer_threads=cfg.tokenizer_threads, stage_transport=cfg.stage_transport,
        stream_transport=cfg.stream_transport)
