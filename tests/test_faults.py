"""The one fault layer (deployments/faults.py): what is retried and how often, poison requests, timeouts, and what
the client is told — unit tests with Ray's real exception types, then a live app on a local Ray instance whose
Classification replicas die on one input (fault injection around the real head)."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import httpx
import pytest
from ray import ActorID
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError

from conftest import local_serve
from seedoss.deployments.faults import CallTimeout, PoisonRequest, RetryPolicy
from seedoss.deployments.ingress import service_error

FAST = RetryPolicy(attempts=5, total_s=10, backoff_s=0.001, max_backoff_s=0.001)


class Flaky:
    """Raises each of `errors` on successive calls, then answers "ok"; counts the calls."""

    def __init__(self, *errors):
        self.errors, self.calls = list(errors), 0

    async def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def run(coro):
    return asyncio.run(coro)


def test_unavailable_replicas_are_waited_out_within_the_budget():
    fn = Flaky(*[ActorUnavailableError("restarting", None)] * 4)
    assert run(FAST.call(fn, "call")) == "ok" and fn.calls == 5
    fn = Flaky(*[ActorUnavailableError("restarting", None)] * 5)
    with pytest.raises(ActorUnavailableError):
        run(FAST.call(fn, "call"))
    assert fn.calls == 5  # attempts, the first included


def lost(replica: int) -> ActorUnavailableError:
    """What a call over gRPC sees when its replica (actor id from `replica`) died under it or was already gone."""
    return ActorUnavailableError("connection lost", ActorID(bytes([replica]) * ActorID.size()).binary())


def test_a_call_is_sent_again_after_one_lost_replica_and_is_poison_after_two():
    fn = Flaky(lost(1))
    assert run(FAST.call(fn, "call")) == "ok" and fn.calls == 2
    fn = Flaky(lost(1), lost(1), ActorUnavailableError("no replica yet", None), lost(1))
    assert run(FAST.call(fn, "call")) == "ok" and fn.calls == 5  # the same lost replica, reached again, counts once
    fn = Flaky(lost(1), ActorUnavailableError("no replica yet", None), lost(2))
    with pytest.raises(PoisonRequest):
        run(FAST.call(fn, "call"))
    assert fn.calls == 3
    error = service_error(PoisonRequest("classify call: 2 replicas were lost under it"))
    assert error.http_status == 500 and error.error_id in error.message and "lost" not in error.message


def test_overload_and_other_errors_are_not_retried():
    for exc in (BackPressureError(num_queued_requests=3, max_queued_requests=3), ValueError("bad")):
        fn = Flaky(exc)
        with pytest.raises(type(exc)):
            run(FAST.call(fn, "call"))
        assert fn.calls == 1
    assert service_error(BackPressureError(num_queued_requests=3, max_queued_requests=3)).http_status == 429


def test_a_hung_call_is_cancelled_at_its_timeout_and_answered_503():
    cancelled = asyncio.Event()

    async def hang():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def scenario():
        start = time.monotonic()
        with pytest.raises(CallTimeout):
            await FAST.call(hang, "stage forward", timeout_s=0.2)
        return time.monotonic() - start, cancelled.is_set()

    elapsed, was_cancelled = run(scenario())
    assert 0.2 <= elapsed < 2 and was_cancelled
    error = service_error(CallTimeout("stage forward took longer than 0.2s"))
    assert error.http_status == 503 and error.http_headers().get("Retry-After") == "5"


def test_replica_ids_and_internals_never_reach_the_client():
    message = service_error(ActorDiedError()).message
    assert "Actor" not in message and "pid" not in message.lower()


def test_a_stage_health_check_answers_during_a_forward_and_fails_a_hung_one(demo_checkpoint):
    """check_health reads how long the running forward has taken, without queueing on the stage's worker thread."""
    import threading

    import torch

    from seedoss.deployments.stage import SeedOssStage

    stage = SeedOssStage(str(demo_checkpoint), 0, 2, "float32", 1 << 20, 16, "cpu", forward_timeout_s=0.5)
    release = threading.Event()
    stage.executor.stage.forward = lambda *args, **kwargs: release.wait()  # a forward that hangs until released
    busy = stage.executor.worker.submit(stage.executor._forward, torch.tensor([1, 2]), ["s"], [2], [0], False)
    time.sleep(0.1)
    start = time.monotonic()
    stage.check_health()  # healthy so far, and answered at once although the worker is busy
    assert time.monotonic() - start < 0.05 and 0 < stage.executor.busy_for() < 0.5
    time.sleep(0.5)
    with pytest.raises(RuntimeError, match="running one forward"):
        stage.check_health()
    release.set()
    busy.result(timeout=5)
    assert stage.executor.busy_for() == 0
    stage.check_health()


# ------------------------------------------------------------------------------------------------ live: poison

POISON = "please crash this replica"


def _poisonable_head():
    """The real Classification head, except that an input equal to POISON kills its replica process (a stand-in for
    an input that crashes a replica)."""
    from seedoss.deployments.heads import TaskHead

    class PoisonableHead(TaskHead):
        async def __call__(self, body: dict) -> dict:
            if body.get("inputs") == POISON:
                os._exit(1)
            return await super().__call__(body)

    return PoisonableHead


@pytest.fixture(scope="module")
def poison_server(demo_checkpoint, tmp_path_factory):
    from ray import cloudpickle, serve

    import seedoss.deployments.app as app_module

    with local_serve(tmp_path_factory) as ray_serve:
        cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
        original, app_module.TaskHead = app_module.TaskHead, _poisonable_head()
        try:
            serve.run(app_module.build_app({
                "checkpoint": str(demo_checkpoint), "num_stages": 2, "classify": {"num_replicas": 2},
                "head_placement": "deployments",
                "head_checkpoints": {"classify": str(demo_checkpoint / "heads" / "classify")}}),
                name="poison", route_prefix="/")
        finally:
            app_module.TaskHead = original
        yield ray_serve.url


def test_a_poison_request_is_tried_twice_then_answered_500_and_the_service_recovers(poison_server):
    with httpx.Client(base_url=poison_server, timeout=300) as client:
        ok = client.post("/v1/classify", json={"inputs": "what a lovely day"})
        assert ok.status_code == 200
        r = client.post("/v1/classify", json={"inputs": POISON})
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert error["type"] == "internal_server_error" or "internal" in error["type"]
        assert "Actor" not in error["message"] and "died" not in error["message"]
        deadline = time.monotonic() + 120
        while True:  # Serve replaces the two replicas it killed; normal requests are answered again
            again = client.post("/v1/classify", json={"inputs": "what a lovely day"})
            if again.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert again.status_code == 200 and again.json() == ok.json()
