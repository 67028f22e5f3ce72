"""Generation engine: sequences → scheduler → stage executors → LM head + sampler → streamed outputs."""

from .engine import (
    CompletionOutput, EngineConfig, EngineObserver, EngineStats, LLMEngine, RequestError, RequestOutput, collect,
)
from .executor import LocalPipeline, LocalStageExecutor, Pipeline, StageUnavailable

__all__ = [
    "CompletionOutput", "EngineConfig", "EngineObserver", "EngineStats", "LLMEngine", "LocalStageExecutor", "RequestError",
    "LocalPipeline", "Pipeline", "RequestOutput", "StageUnavailable", "collect",
]
