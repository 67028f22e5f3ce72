"""Generation engine: sequences → scheduler (block manager) → pipeline of stage executors → LM head + sampler →
streamed outputs. One module a role, after nano-vllm: sequence, block_manager, scheduler, executor (the stages),
runner (a micro-batch through them), outputs, engine (the loop).

Names are loaded on first use (PEP 562): `seedoss.engine.errors` and `seedoss.engine.block_manager` stay
importable without torch (the gateway maps engine errors without loading a model), while
`from seedoss.engine import LLMEngine` keeps working.
"""

from importlib import import_module

_EXPORTS = {
    "EngineConfig": "config", "RequestError": "errors", "StageUnavailable": "errors",
    "CompletionOutput": "outputs", "EngineObserver": "outputs", "EngineStats": "outputs", "RequestOutput": "outputs",
    "collect": "outputs", "LLMEngine": "engine", "LocalPipeline": "executor", "LocalStageExecutor": "executor",
    "Pipeline": "executor",
}
__all__ = [  # noqa: F822 (loaded by __getattr__)
    "CompletionOutput", "EngineConfig", "EngineObserver", "EngineStats", "LLMEngine", "LocalPipeline",
    "LocalStageExecutor", "Pipeline", "RequestError", "RequestOutput", "StageUnavailable", "collect",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
