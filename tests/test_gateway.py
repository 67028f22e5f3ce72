"""Gateway behaviour on a running app: bearer auth, body limit, overload answered with 429 (never a timeout),
Prometheus metrics through Ray, readiness, and a head service autoscaling up under load and back down."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from conftest import local_serve

pytestmark = pytest.mark.timeout(900)
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(demo_checkpoint, tmp_path_factory):
    from ray import serve

    from seedoss.deployments.app import build_app

    with local_serve(tmp_path_factory, grpc=True, metrics=True) as ray_serve:
        serve.run(build_app({
            "checkpoint": str(demo_checkpoint), "num_stages": 2, "api_keys": [KEY],
            "limits": {"max_body_bytes": 64 * 1024},
            "head_placement": "deployments",  # the head services' own bounds and autoscaling are under test here
            # a deliberately tiny classification service: one request at a time, one queued, so load overflows it
            "classify": {"max_ongoing_requests": 1, "max_queued_requests": 1},
            "tag": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                           "upscale_delay_s": 0.5, "downscale_delay_s": 3, "look_back_period_s": 1}},
        }), name="seedoss", route_prefix="/")
        yield ray_serve


def test_auth_required_except_probes(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        body = {"prompt": "hi", "max_tokens": 2}
        r = c.post("/v1/generate", json=body)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = c.post("/v1/generate", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = c.post("/v1/generate", json=body, headers={"Authorization": KEY})  # no scheme
        assert r.status_code == 401
        assert c.post("/v1/generate", json=body, headers=AUTH).status_code == 200
        assert c.get("/health/live").status_code == 200
        ready = c.get("/health/ready")
        assert ready.status_code == 200 and set(ready.json()["heads"]) == {"generate", "classify", "tag", "qa", "embed"}


def test_grpc_auth(server):
    import grpc

    from seedoss.proto.seedoss.v1 import seedoss_pb2 as pb
    from seedoss.proto.seedoss.v1 import seedoss_pb2_grpc as pb_grpc

    stub = pb_grpc.SeedOssStub(grpc.insecure_channel(server.grpc))
    request = pb.ClassifyRequest(inputs=["hello"])
    for metadata in [(), (("authorization", "Bearer wrong"),)]:
        with pytest.raises(grpc.RpcError) as e:
            stub.Classify(request, metadata=(("application", "seedoss"), *metadata), timeout=60)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(prompt="x", max_tokens=2), metadata=(("application", "seedoss"),), timeout=60))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ok = stub.Classify(request, metadata=(("application", "seedoss"), ("authorization", f"Bearer {KEY}")), timeout=60)
    assert ok.results[0].predictions
    assert stub.Health(pb.HealthRequest(), metadata=(("application", "seedoss"),), timeout=60).status == "ready"


def test_body_limit(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/generate", json={"prompt": "x" * 70_000}, headers=AUTH)
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: measured after reading
            yield b'{"prompt": "'
            yield b"x" * 70_000
            yield b'"}'

        r = c.post("/v1/generate", content=chunks(), headers=AUTH)
        assert r.status_code == 413
        assert c.post("/v1/generate", json={"prompt": "ok", "max_tokens": 1}, headers=AUTH).status_code == 200


def test_overload_gets_429_with_retry_after_not_timeouts(server):
    body = {"inputs": ["a fairly long sentence to classify " * 20] * 4}

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60, headers=AUTH) as c:
            return await asyncio.gather(*[c.post("/v1/classify", json=body) for _ in range(24)])

    start = time.monotonic()
    responses = asyncio.run(main())
    codes = [r.status_code for r in responses]
    assert time.monotonic() - start < 60
    assert set(codes) <= {200, 429, 503} and codes.count(200) >= 1 and codes.count(429) + codes.count(503) >= 1
    for r in responses:
        if r.status_code in (429, 503):
            assert "Retry-After" in r.headers or r.status_code == 503
            assert r.headers["content-type"].startswith("application/json")
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c:
        assert c.post("/v1/classify", json={"inputs": "still serving"}).status_code == 200


def _series(text: str, metric: str, *labels: str) -> list[str]:
    """The lines of `metric` that carry every one of `labels` (e.g. 'status="400"')."""
    return [line for line in text.splitlines() if line.startswith(metric) and all(x in line for x in labels)]


def _scrape(url: str, names: list[str], series: tuple[tuple[str, ...], ...] = (), deadline_s: float = 60) -> str:
    """The metrics text once every name is in it and every `series` (metric, *labels) has a line, or at the deadline
    (Ray exports every few seconds: series recorded by earlier tests can be there while this test's are not yet, so
    wait for the exact series, not for one of its labels)."""
    end = time.monotonic() + deadline_s
    while True:
        text = httpx.get(url, timeout=10).text
        if all(n in text for n in names) and all(_series(text, *s) for s in series) or time.monotonic() > end:
            return text
        time.sleep(2)


def test_prometheus_metrics(server):
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c:
        c.post("/v1/generate", json={"prompt": "metrics please", "max_tokens": 5, "ignore_eos": True})
        c.post("/v1/tag", json={"inputs": "Ada in London"})
        c.post("/v1/answer", json={"question": "?"})  # an error, counted as such
    names = ["ray_seedoss_requests_total", "ray_seedoss_request_latency_seconds_bucket",
             "ray_seedoss_time_to_first_token_seconds_bucket", "ray_seedoss_inter_token_latency_seconds_bucket",
             "ray_seedoss_generation_tokens_total", "ray_seedoss_prompt_tokens_total", "ray_seedoss_kv_cache_usage",
             "ray_seedoss_running_sequences", "ray_seedoss_waiting_sequences", "ray_seedoss_head_requests_total",
             "ray_seedoss_head_latency_seconds_bucket", "ray_seedoss_sequence_steps_total",
             "ray_seedoss_prefix_cache_queries_total", "ray_seedoss_batch_sequences_bucket",
             "ray_seedoss_batch_tokens_bucket"]
    batchers = ('batcher="tag"', 'batcher="stage0-1"', 'batcher="stage2-3"')  # the head's and each stage's prefill
    answered = ("ray_seedoss_requests_total", 'route="/v1/answer"', 'status="400"')
    tagged = ("ray_seedoss_head_requests_total", 'task="tag"', 'outcome="ok"')
    batched = tuple(("ray_seedoss_batch_sequences_count", b) for b in batchers)
    text = _scrape(server.metrics, names, series=(answered, tagged, *batched))
    missing = [n for n in names if n not in text]
    assert not missing, missing
    assert _series(text, *answered) and _series(text, *tagged)
    assert all(_series(text, *b) for b in batched), _series(text, "ray_seedoss_batch_sequences_count")


def _replicas(deployment: str) -> int:
    from ray import serve

    status = serve.status().applications["seedoss"].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def test_head_service_scales_up_under_load_and_back_down(server):
    assert _replicas("Tagging") == 1
    stop = time.monotonic() + 120
    peak = 1

    async def client(c):
        while time.monotonic() < stop and peak < 2:
            await c.post("/v1/tag", json={"inputs": ["Ada Lovelace met Charles Babbage in London " * 8] * 4})

    async def watch():
        nonlocal peak
        while time.monotonic() < stop and peak < 2:
            peak = max(peak, _replicas("Tagging"))
            await asyncio.sleep(0.5)

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120, headers=AUTH) as c:
            await asyncio.gather(watch(), *[client(c) for _ in range(6)])

    asyncio.run(main())
    assert peak == 2, "Tagging did not scale up under load"
    deadline = time.monotonic() + 120
    while _replicas("Tagging") > 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert _replicas("Tagging") == 1, "Tagging did not scale back down when idle"
