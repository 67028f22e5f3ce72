"""A sequence being generated: its tokens, how many of them every stage has cached, and its stream state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from ..detokenizer import IncrementalDetokenizer, StopStringMatcher
from ..sampling import SamplingParams, SamplingState


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] | None  # the `logprobs` most likely tokens, when requested


@dataclass(eq=False)  # identity: a sequence is only ever equal to itself
class Sequence:
    seq_id: str  # the stages' cache key: unique across engines, replicas and restarts
    request_key: str  # the engine's key of the request this sequence belongs to
    index: int  # which of the request's `n` choices
    prompt_ids: list[int]
    params: SamplingParams
    sampling: SamplingState
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose KV every stage holds
    retries: int = 0  # steps retried because a stage was unavailable
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    arrival_time: float = field(default_factory=time.monotonic)
    last_token_time: float | None = None
    # what the next RequestOutput carries for this sequence
    pending_text: str = ""
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def token_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        return (self.prompt_ids[start:] if start < n else []) + self.output_ids[max(start - n, 0): end - n]

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status, self.finish_reason, self.stop_reason = Status.FINISHED, reason, stop_reason

    def take_pending(self) -> tuple[str, list[int], list[TokenLogprob]]:
        out = (self.pending_text, self.pending_ids, self.pending_logprobs)
        self.pending_text, self.pending_ids, self.pending_logprobs = "", [], []
        return out
