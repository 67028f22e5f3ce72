"""A sequence being generated: its tokens, how many of them every stage has cached, the prefix-cache names of its
full blocks, its stream state, and when it stops."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from ..detokenizer import IncrementalDetokenizer, StopStringMatcher
from ..sampling import SamplingParams, SamplingState
from .block_manager import BlockHash, hash_blocks


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
    cache_salt: str | None = None  # isolates this request's prefix-cache entries (tenants)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose KV every stage holds
    num_cached_tokens: int | None = None  # prompt tokens the prefix cache supplied at first admission
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
    _hashes: list[BlockHash] = field(default_factory=list)  # hash chain of the full blocks seen so far

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

    def block_hashes(self, start: int, end: int, block_size: int) -> list[BlockHash]:
        """The prefix-cache names of full blocks [start, end) (hashed once, on first need)."""
        if len(self._hashes) < end:
            hash_blocks(self.token_slice(0, end * block_size), block_size, self.cache_salt, self._hashes)
        return self._hashes[start:end]

    def append_token(self, token: int, eos_token_ids, max_model_len: int) -> None:
        """Take a sampled token: stream its text, and finish on a stop string, stop token, eos or length."""
        params = self.params
        self.output_ids.append(token)
        self.sampling.append(token)
        self.pending_ids.append(token)
        text, stopped, matched = self.stop_matcher.feed(self.detokenizer.add(token))
        self.pending_text += text
        if stopped:
            self.finish("stop", matched)
        elif token in params.stop_token_ids:
            self.finish("stop", token)
        elif not params.ignore_eos and token in eos_token_ids:
            self.finish("stop")
        elif len(self.output_ids) >= params.max_tokens or self.num_tokens >= max_model_len:
            self.finish("length")
        if self.finished and not stopped:
            text, stopped, matched = self.stop_matcher.feed(self.detokenizer.flush())
            self.pending_text += text + self.stop_matcher.flush()
            if stopped:
                self.finish("stop", matched)

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status, self.finish_reason, self.stop_reason = Status.FINISHED, reason, stop_reason

    def take_pending(self) -> tuple[str, list[int], list[TokenLogprob]]:
        out = (self.pending_text, self.pending_ids, self.pending_logprobs)
        self.pending_text, self.pending_ids, self.pending_logprobs = "", [], []
        return out
