"""Prefix-aware lane routing (deployments/prefix_routing.py). Without Ray: the router's choice (longest prefix within
the load bound, fresh prefixes to the emptiest lane, power-of-two-choices otherwise), its bounded per-lane memory and
how AppConfig turns it on. On a real local cluster with 2 lanes (one app deploy): chats with distinct system prompts
spread over both lanes, and chats sharing a long system prompt all land on one lane, every one after the first
reporting cached tokens."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest

from seedoss.deployments.config import PREFIX_ROUTER, AppConfig
from seedoss.deployments.prefix_routing import PrefixIndex, choose_lane
from seedoss.engine.block_manager import hash_blocks
from conftest import local_serve

pytestmark = pytest.mark.timeout(900)


def _names(tokens: list[int], salt: str | None = None) -> list[bytes]:
    return hash_blocks(tokens, 16, salt, [])


SHARED = list(range(100, 164))  # 4 full blocks


def test_longest_prefix_wins_within_the_load_bound():
    index = PrefixIndex(capacity=1000)
    index.record("a", _names(SHARED[:32]))
    index.record("b", _names(SHARED + [7] * 5))
    prompt = _names(SHARED + [9] * 20)  # 5 full blocks, the first 4 shared with what b was sent
    assert index.matched("a", prompt) == 2 and index.matched("b", prompt) == 4
    assert choose_lane(prompt, {"a": 0, "b": 3}, index, imbalance=3, min_blocks=1) == "b"
    # b is overloaded (more than `imbalance` above the least loaded lane): the next longest match inside the bound
    assert choose_lane(prompt, {"a": 0, "b": 4}, index, imbalance=3, min_blocks=1) == "a"
    assert choose_lane(prompt, {"a": 0, "b": 4, "c": 0}, index, imbalance=3, min_blocks=3) == "c"  # fewest held


def test_a_fresh_prefix_goes_to_the_lane_holding_least_and_short_prompts_to_power_of_two():
    index = PrefixIndex(capacity=1000)
    index.record("a", _names(SHARED))
    assert choose_lane(_names([5] * 40), {"a": 0, "b": 0}, index, imbalance=8, min_blocks=1) == "b"
    assert choose_lane(_names([5] * 40), {"a": 0, "b": 9}, index, imbalance=8, min_blocks=1) == "a"  # b too busy
    assert choose_lane(_names([5] * 15), {"a": 0, "b": 0}, index, imbalance=8, min_blocks=1) is None  # no full block
    assert choose_lane(_names(SHARED), {}, index, imbalance=8, min_blocks=1) is None  # every lane full


def test_the_salt_separates_prefixes_as_in_the_engine():
    index = PrefixIndex(capacity=1000)
    index.record("a", _names(SHARED, salt="tenant-1"))
    assert index.matched("a", _names(SHARED, salt="tenant-1")) == 4
    assert index.matched("a", _names(SHARED)) == 0 and index.matched("a", _names(SHARED, salt="tenant-2")) == 0


def test_memory_is_bounded_forgets_tails_first_and_follows_the_replica_set():
    index = PrefixIndex(capacity=6)
    index.record("a", _names(SHARED))
    index.record("a", _names([1] * 64))  # 4 more: the oldest prompt keeps only its head
    assert index.held("a") == 6
    assert index.matched("a", _names(SHARED)) == 2 and index.matched("a", _names([1] * 64)) == 4
    index.record("b", _names(SHARED))
    index.retain(["b"])  # a scaled in
    assert index.held("a") == 0 and index.held("b") == 4
    index.forget("b")  # b's actor died
    assert index.held("b") == 0


def test_app_config_turns_the_router_on_for_more_than_one_lane():
    base = {"checkpoint": "x", "num_stages": 1}
    two = AppConfig.model_validate({**base, "lanes": {"min": 1, "max": 2, "prefix_imbalance": 3}})
    router = two.generation_options()["request_router_config"]
    assert router["request_router_class"] == PREFIX_ROUTER
    assert router["request_router_kwargs"] == {"block_size": 16, "imbalance": 3, "min_blocks": 1,
                                               "blocks_per_lane": 65536}
    # off, or a single lane: Serve's default router (power-of-two-choices on ongoing requests), as before
    off = AppConfig.model_validate({**base, "lanes": {"min": 2, "max": 2, "prefix_affinity": False}})
    assert "request_router_config" not in off.generation_options()
    assert "request_router_config" not in AppConfig.model_validate(base).generation_options()


@pytest.fixture(scope="module")
def lanes(demo_checkpoint, tmp_path_factory):
    from ray import serve

    from seedoss.deployments.app import build_app

    with local_serve(tmp_path_factory) as ray_serve:
        serve.run(build_app({"checkpoint": str(demo_checkpoint), "num_stages": 1, "head_checkpoints": {},
                             "lanes": {"min": 2, "max": 2}, "stage_threads": 2}), name="prefix", route_prefix="/")
        with httpx.Client(base_url=ray_serve.url, timeout=300) as http:
            yield SimpleNamespace(http=http)


def _finished_by_lane() -> dict[str, int]:
    """Requests finished per Generation replica (asked until both replicas answered)."""
    from ray import serve

    handle = serve.get_deployment_handle("Generation", "prefix")
    finished: dict[str, int] = {}
    while len(finished) < 2:
        s = handle.stats.remote().result()
        finished[s["replica"]] = s["requests_finished"]
    return finished


def _chat(lanes, system: str, user: str) -> tuple[str, int]:
    """(the lane that served it, cached prompt tokens) of one chat."""
    before = _finished_by_lane()
    r = lanes.http.post("/v1/chat/completions", json={
        "model": "seedoss", "max_tokens": 2, "temperature": 0,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]})
    r.raise_for_status()
    after = _finished_by_lane()
    (lane,) = [k for k in after if after[k] != before.get(k, 0)]
    return lane, r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_distinct_prefixes_spread_and_a_shared_prefix_stays_on_its_lane(lanes):
    topics = ("old harbour towns", "alpine railways", "desert observatories", "river deltas")  # differ in block 0
    distinct = [_chat(lanes, f"{t.capitalize()}: you are a careful guide to them, answering in full sentences. " * 4,
                      "Begin.")
                for t in topics]
    assert len({lane for lane, _ in distinct}) == 2 and all(cached == 0 for _, cached in distinct)

    system = "You are a patient guide to the history of lighthouses and the keepers who ran them. " * 8
    shared = [_chat(lanes, system, q) for q in ("When was it built?", "Who built it?", "Is it open?", "How tall?")]
    assert len({lane for lane, _ in shared}) == 1
    assert shared[0][1] == 0 and all(cached > 0 for _, cached in shared[1:])


def test_stage_replicas_run_the_configured_torch_threads(lanes):
    from ray import serve

    info = serve.get_deployment_handle("SeedOssStage0", "prefix").info.remote().result()  # every replica alike
    assert info["torch_threads"] == 2  # `stage_threads: 2`, not Ray's 1 for a replica with no CPU of its own
