"""What the engine hands out: per-request output deltas, statistics, and observer hooks for metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from .sequence import TokenLogprob


@dataclass
class CompletionOutput:
    index: int
    text: str  # new text since the previous output of this request (full text from `collect`)
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache (OpenAI usage `cached_tokens`)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    requests_finished: int
    batches: int  # micro-batches the pipeline ran
    steps: int  # sequence-steps the pipeline ran (one per sequence per micro-batch)
    cache_misses: int  # of those, steps a stage answered without the sequence's cache (recomputed)
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache (at each sequence's admission)
    prefix_cache_hits: int  # of those, tokens found cached
    ttft_s: list[float]
    inter_token_s: list[float]


class EngineObserver:
    """Hooks for exporting metrics (the Serve deployment forwards them to Ray's Prometheus metrics)."""

    def on_first_token(self, seconds: float) -> None: ...
    def on_next_token(self, seconds: float) -> None: ...
    def on_prompt(self, tokens: int) -> None: ...
    def on_step(self, sequences: int, cache_misses: int) -> None: ...
    def on_prefix_cache(self, queries: int, hits: int) -> None: ...


async def collect(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    """Merge a request's streamed deltas into its final output (one CompletionOutput per choice)."""
    merged: dict[int, CompletionOutput] = {}
    last = None
    async for out in stream:
        last = out
        for o in out.outputs:
            m = merged.setdefault(o.index, CompletionOutput(o.index, "", [], [] if o.logprobs is not None else None))
            m.text += o.text
            m.token_ids += o.token_ids
            if o.logprobs is not None:
                m.logprobs += o.logprobs
            m.finish_reason, m.stop_reason = o.finish_reason, o.stop_reason
    return RequestOutput(last.request_id, last.prompt_token_ids, [merged[i] for i in sorted(merged)], last.finished,
                         last.num_cached_tokens)
