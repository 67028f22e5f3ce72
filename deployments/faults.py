"""What can go wrong between replicas, in one place: which Ray and Serve errors mean that a replica was lost
(retry or hand over elsewhere) or that a deployment is saturated (answer 429), and the one retry policy every
caller uses — stage chains, head calls and generation streams alike (`AppConfig.retry`).

A replica that was lost may have been killed by the call itself (a poison request: a huge or malformed input that
crashes the process), so a call is sent again after at most `crash_retries` (default one) *distinct* replicas were
lost under it: one request cannot take down replica after replica; then the client gets a 5xx with an error id.
Distinct, because a retry can reach the same lost replica again before Serve notices it is gone, and because calls
go over gRPC by value (`serve_env`), where Serve reports a replica that died under the call and one that was
already gone alike (`ActorUnavailableError`, "may or may not have been executed"): each lost replica is counted
once, whichever it was. Losses that name no replica (no replica running, the deployment being replaced) are sent
again while the budget lasts. A call that takes longer than its timeout is cancelled and answered 503."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

log = logging.getLogger(__name__)
T = TypeVar("T")


class StageConnectionLost(ConnectionError):
    """A stage replica's step connection (deployments/step_channel.py) broke or could not be made: the replica
    died or is going away, as a RayActorError says on the Serve path."""

    def __init__(self, replica: str, message: str):
        super().__init__(message)
        self.replica = replica


# A replica died, is restarting or is being replaced (RayActorError covers ActorDiedError and
# ActorUnavailableError): the call never completed there, and may be sent again.
REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, StageConnectionLost)


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


def lost_replica(exc: BaseException) -> str | None:
    """The id of the replica actor that died or became unavailable with the call, if the error names one."""
    for e in _causes(exc):
        if isinstance(e, RayActorError) and e.actor_id:
            return e.actor_id
        if isinstance(e, StageConnectionLost):
            return e.replica
    return None


class PoisonRequest(RuntimeError):
    """A call that lost more distinct replicas than `RetryPolicy.crash_retries` allows: not sent again."""


class CallTimeout(TimeoutError):
    """A call took longer than its timeout (a hung replica): it was cancelled, not retried."""


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
    crash_retries: int = Field(1, ge=0, description="distinct replicas a call may lose and still be sent again (poison guard)")

    def retries(self, what: str) -> "Retries":
        return Retries(self, what)

    async def call(self, fn: Callable[[], Awaitable[T]], what: str, timeout_s: float | None = None) -> T:
        """`await fn()`, sent again (a fresh `fn()`) while its replica was lost and the policy allows; each try is
        cancelled after `timeout_s` (CallTimeout)."""
        retries = self.retries(what)
        while True:
            try:
                return await within(fn(), timeout_s, what)
            except CallTimeout:
                raise
            except Exception as e:
                delay = retries.delay_after(e)
                if delay is None:
                    raise
            await asyncio.sleep(delay)


async def within(awaitable: Awaitable[T], timeout_s: float | None, what: str) -> T:
    """`await awaitable`, cancelled after `timeout_s` (CallTimeout naming `what`)."""
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except TimeoutError:
        raise CallTimeout(f"{what} took longer than {timeout_s:g}s") from None


class Retries:
    """The retry budget of one call (or one stream): how long to wait before sending it again after `exc`, or None
    when it must not be sent again (not a lost replica, budget spent). Raises PoisonRequest when more than
    `crash_retries` distinct replicas were lost under it."""

    def __init__(self, policy: RetryPolicy, what: str):
        self.policy, self.what = policy, what
        self.deadline = time.monotonic() + policy.total_s
        self.backoff, self.tries = policy.backoff_s, 1
        self.lost: set[str] = set()  # ids of the replica actors lost under this call

    def delay_after(self, exc: BaseException) -> float | None:
        if not replica_lost(exc):
            return None
        if (replica := lost_replica(exc)) is not None:
            self.lost.add(replica)
        if len(self.lost) > self.policy.crash_retries:
            raise PoisonRequest(f"{self.what}: {len(self.lost)} replicas were lost under it; not sent again") from exc
        if self.tries >= self.policy.attempts or time.monotonic() + self.backoff > self.deadline:
            return None
        delay, self.tries = self.backoff, self.tries + 1
        self.backoff = min(2 * self.backoff, self.policy.max_backoff_s)
        log.warning("%s: replica lost (%s); sending it again in %.2fs", self.what, type(exc).__name__, delay)
        return delay


class Timeouts(BaseModel):
    """How long a call may take before it is cancelled and answered 503 (+ Retry-After): a hung replica never hangs
    a request. A stage replica busy with one forward for longer than `stage_s` also fails its health check, so Serve
    replaces it."""

    model_config = ConfigDict(extra="forbid")

    stage_s: float = Field(60.0, gt=0, description="one stage forward (a generation step or a cache-less chunk)")
    head_s: float = Field(300.0, gt=0, description="one head call, queueing included (a unary request, or the wait "
                                                   "for a generation stream's next chunk)")
