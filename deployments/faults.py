"""What can go wrong between replicas, in one place: which Ray and Serve errors mean that a replica was lost
(retry or hand over elsewhere) or that a deployment is saturated (answer 429), and the one retry policy every
caller uses — stage chains, head calls and generation streams alike (`AppConfig.retry`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

log = logging.getLogger(__name__)
T = TypeVar("T")

# A replica died, is restarting or is being replaced (RayActorError covers ActorDiedError and
# ActorUnavailableError): the call never completed there, and may be sent again.
REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


def _causes(exc: BaseException, depth: int = 4):
    """`exc` and what it wraps: a RayTaskError's cause, or the `__cause__` Serve sets when a chained call's
    upstream replica died."""
    for _ in range(depth):
        if exc is None:
            return
        yield exc
        exc = getattr(exc, "cause", None) if isinstance(exc, RayTaskError) else exc.__cause__


def replica_lost(exc: BaseException) -> bool:
    return any(isinstance(e, REPLICA_LOST) for e in _causes(exc))


def backpressure(exc: BaseException) -> bool:
    """A deployment's `max_queued_requests` was reached: overload, answered 429, never retried here."""
    return any(isinstance(e, BackPressureError) for e in _causes(exc))


class RetryPolicy(BaseModel):
    """How a call whose replica was lost is sent again: at most `attempts` times within `total_s` seconds, waiting
    `backoff_s` (doubling up to `max_backoff_s`) in between. Only calls that are safe to repeat use it: cache-less
    stage forwards, unary head calls, generation steps (the stage truncates to the step's context), and generation
    streams resumed after the tokens the client already has."""

    model_config = ConfigDict(extra="forbid")

    attempts: int = Field(8, ge=1, description="tries of one call, the first included")
    total_s: float = Field(60.0, gt=0, description="no retry starts later than this after the first try")
    backoff_s: float = Field(0.25, ge=0)
    max_backoff_s: float = Field(4.0, ge=0)

    def backoffs(self) -> Iterator[float]:
        """The wait before each retry: one per retry the budget allows (attempts and time), then it ends."""
        deadline = time.monotonic() + self.total_s
        backoff = self.backoff_s
        for _ in range(self.attempts - 1):
            if time.monotonic() + backoff > deadline:
                return
            yield backoff
            backoff = min(2 * backoff, self.max_backoff_s)

    async def call(self, fn: Callable[[], Awaitable[T]], what: str) -> T:
        """`await fn()`, sent again (a fresh `fn()`) while its replica was lost and the budget lasts."""
        backoffs = self.backoffs()
        attempt = 1
        while True:
            try:
                return await fn()
            except Exception as e:
                delay = next(backoffs, None) if replica_lost(e) else None
                if delay is None:
                    raise
                log.warning("%s: replica lost (%s); retry %d in %.2fs", what, type(e).__name__, attempt, delay)
            await asyncio.sleep(delay)
            attempt += 1
