"""Generation lanes on a real 3-node local cluster (head + one node per stage, stages pinned): two lanes serve 32
concurrent streams equal to transformers' greedy output with almost no cache misses; two engines reached by setting
Generation replicas directly never read each other's KV; killing a lane's Generation replica and a stage replica
mid-stream loses and repeats no token; load scales lanes 1 → 2 → 1 with no failed request."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

from seedoss.tokenizer import SeedOssTokenizer
from conftest import local_serve

pytestmark = pytest.mark.timeout(900)
STREAMS = 32


@pytest.fixture(scope="module")
def cluster(demo_checkpoint, tmp_path_factory):
    nodes = {f"stage{k}": {"num_cpus": 0, "resources": {f"stage{k}": 4}} for k in range(2)}
    with local_serve(tmp_path_factory, nodes=nodes) as ray_serve:
        yield SimpleNamespace(url=ray_serve.url, checkpoint=demo_checkpoint)


def _deploy(cluster, name: str, **config):
    from ray import serve

    from seedoss.deployments.app import build_app

    app = {"checkpoint": str(cluster.checkpoint), "num_stages": 2, "head_checkpoints": {},
           "retry": {"attempts": 200, "total_s": 120, "backoff_s": 0.5, "max_backoff_s": 0.5}, **config}
    serve.run(build_app(app), name=name, route_prefix=f"/{name}")
    return f"{cluster.url}/{name}"


def _prompts(checkpoint) -> list[list[int]]:
    """32 prompts of 3 to 40 tokens cut from the demo corpus."""
    import seedoss

    corpus = (Path(seedoss.__file__).parent / "data" / "corpus.txt").read_text(encoding="utf-8")
    ids = SeedOssTokenizer.from_pretrained(checkpoint).encode(corpus)
    return [ids[97 * i: 97 * i + 3 + (i * 7) % 38] for i in range(STREAMS)]


def _hf_greedy(checkpoint, prompts, max_tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    out = []
    for ids in prompts:
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
        out.append(gen[0, len(ids):].tolist())
    return out


async def _stream(client, url, body) -> list[int]:
    """The token ids of one streamed generation; fails on any error, in-band or not."""
    async with client.stream("POST", f"{url}/v1/generate", json={**body, "stream": True}) as s:
        assert s.status_code == 200, await s.aread()
        tokens, done = [], False
        async for line in s.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                tokens += choice["token_ids"]
    assert done
    return tokens


async def _streams(url, prompts, max_tokens, during=None):
    async with httpx.AsyncClient(timeout=600) as client:
        tasks = [asyncio.create_task(_stream(client, url, {"prompt_token_ids": p, "max_tokens": max_tokens,
                                                           "temperature": 0})) for p in prompts]
        if during is not None:
            await during()
        return await asyncio.gather(*tasks)


def _generation_stats(app: str) -> dict[str, dict]:
    """`Generation.stats()` of every replica of the app, by replica id (asked until each has answered)."""
    from ray import serve

    handle = serve.get_deployment_handle("Generation", app)
    replicas = _running(app, "Generation")
    stats: dict[str, dict] = {}
    for _ in range(200):
        s = handle.stats.remote().result()
        stats[s["replica"]] = s
        if len(stats) >= replicas:
            break
    return stats


def _running(app: str, deployment: str) -> int:
    from ray import serve

    return serve.status().applications[app].deployments[deployment].replica_states.get("RUNNING", 0)


def _replica_actor(app: str, deployment: str):
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#")]
    return ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])


@pytest.fixture(scope="module")
def two_lanes(cluster):
    url = _deploy(cluster, "lanes", lanes={"min": 2, "max": 2}, pin_stages=True)
    yield SimpleNamespace(url=url, app="lanes", checkpoint=cluster.checkpoint)
    from ray import serve

    serve.delete("lanes")


def test_two_lanes_serve_32_streams_equal_to_transformers_with_few_cache_misses(two_lanes):
    prompts = _prompts(two_lanes.checkpoint)
    reference = _hf_greedy(two_lanes.checkpoint, prompts, 24)
    before = _generation_stats(two_lanes.app)
    assert sorted(s["lane"] for s in before.values()) == [0, 1]
    assert _running(two_lanes.app, "SeedOssStage0") == _running(two_lanes.app, "SeedOssStage1") == 2
    got = asyncio.run(_streams(two_lanes.url, prompts, 24))
    assert got == reference
    after = _generation_stats(two_lanes.app)
    steps = sum(s["steps"] for s in after.values()) - sum(s["steps"] for s in before.values())
    misses = sum(s["cache_misses"] for s in after.values()) - sum(s["cache_misses"] for s in before.values())
    assert steps >= STREAMS * 24 and misses <= 0.01 * steps, (misses, steps)
    # the load was spread: both lanes finished requests
    assert all(a["requests_finished"] > before[r]["requests_finished"] for r, a in after.items())


def test_killing_a_lane_and_a_stage_replica_mid_stream_loses_nothing(two_lanes):
    import ray

    prompts = _prompts(two_lanes.checkpoint)
    reference = _hf_greedy(two_lanes.checkpoint, prompts, 48)
    stats = _generation_stats(two_lanes.app)
    tokens_before = sum(s["generation_tokens"] for s in stats.values())

    async def kill_when_streaming():
        while sum(s["generation_tokens"] for s in (await asyncio.to_thread(_generation_stats, two_lanes.app)).values()
                  ) < tokens_before + 200:
            await asyncio.sleep(0.2)
        ray.kill(_replica_actor(two_lanes.app, "Generation"), no_restart=True)
        ray.kill(_replica_actor(two_lanes.app, "SeedOssStage1"), no_restart=True)

    got = asyncio.run(_streams(two_lanes.url, prompts, 48, during=kill_when_streaming))
    assert got == reference  # every stream completed, no token lost or repeated


def test_two_engines_set_directly_never_share_kv(cluster):
    """Generation replicas set directly (2 engines, one replica per stage, stages not pinned): both engines'
    sequences live in the same stage replicas, and every output still equals the reference."""
    url = _deploy(cluster, "direct", generation={"num_replicas": 2})
    try:
        prompts = _prompts(cluster.checkpoint)
        reference = _hf_greedy(cluster.checkpoint, prompts, 16)
        assert asyncio.run(_streams(url, prompts, 16)) == reference
        stats = _generation_stats("direct")
        assert len(stats) == 2 and all(s["requests_finished"] > 0 for s in stats.values())
    finally:
        from ray import serve

        serve.delete("direct")


def test_lanes_autoscale_up_under_load_and_back_down_with_no_failed_request(cluster):
    url = _deploy(cluster, "auto", pin_stages=True, lanes={
        "min": 1, "max": 2, "target_sequences": 4, "upscale_delay_s": 1, "downscale_delay_s": 5,
        "look_back_period_s": 2})
    try:
        prompts = _prompts(cluster.checkpoint)[:16]
        reference = _hf_greedy(cluster.checkpoint, prompts, 32)
        assert _running("auto", "Generation") == 1
        seen = {"max_lanes": 1}

        async def load_until_two_lanes():
            rounds = []
            async with httpx.AsyncClient(timeout=600) as client:
                deadline = time.monotonic() + 240
                while time.monotonic() < deadline:
                    rounds.append(await asyncio.gather(*[
                        _stream(client, url, {"prompt_token_ids": p, "max_tokens": 32, "temperature": 0})
                        for p in prompts]))
                    lanes = min([await asyncio.to_thread(_running, "auto", d)
                                 for d in ("Generation", "SeedOssStage0", "SeedOssStage1")])
                    seen["max_lanes"] = max(seen["max_lanes"], lanes)
                    if lanes == 2:
                        rounds.append(await asyncio.gather(*[  # a full round on two lanes
                            _stream(client, url, {"prompt_token_ids": p, "max_tokens": 32, "temperature": 0})
                            for p in prompts]))
                        break
            return rounds

        rounds = asyncio.run(load_until_two_lanes())
        assert seen["max_lanes"] == 2
        assert all(r == reference for r in rounds)

        async def trickle_until_one_lane():
            results = []
            async with httpx.AsyncClient(timeout=600) as client:
                deadline = time.monotonic() + 240
                while time.monotonic() < deadline and max([await asyncio.to_thread(_running, "auto", d) for d in (
                        "Generation", "SeedOssStage0", "SeedOssStage1")]) > 1:
                    results.append(await _stream(client, url, {"prompt_token_ids": prompts[0], "max_tokens": 32,
                                                                "temperature": 0}))
                    await asyncio.sleep(0.5)
                results.append(await _stream(client, url, {"prompt_token_ids": prompts[0], "max_tokens": 32,
                                                            "temperature": 0}))
            return results

        trickle = asyncio.run(trickle_until_one_lane())
        assert all(_running("auto", d) == 1 for d in ("Generation", "SeedOssStage0", "SeedOssStage1"))
        assert all(r == reference[0] for r in trickle)
    finally:
        from ray import serve

        serve.delete("auto")
