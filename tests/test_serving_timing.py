"""The serving breakdown's step stamps (deployments/timing.py): two stage replicas' `forward`, called in a chain the way
the Serve pipeline calls them (without Ray: the deployment classes are plain classes), return the same hidden states
as the stages run in process, carry one ordered set of stamps per stage, and `StepTimings` turns them into
non-negative per-component durations that partition the step's wall time. Also: the same-loop Serve switches merge
into a deployment's runtime_env without overriding what the user set."""

from __future__ import annotations

import asyncio
import time

import torch

from seedoss.deployments.config import same_loop
from seedoss.deployments.serve_env import REPLICA_ENV
from seedoss.deployments.stage import SeedOssStage
from seedoss.deployments.timing import StageStamps, StepTimings
from seedoss.deployments.wire import pack, stamps, unpack
from seedoss.config import SeedOssConfig
from seedoss.loader import load_stage
from seedoss.model import StepBatch, run_stages


def test_chained_stage_forwards_match_in_process_and_carry_ordered_stamps(demo_checkpoint):
    layers = SeedOssConfig.from_pretrained(demo_checkpoint).num_hidden_layers
    split = layers // 2
    stages = [SeedOssStage(str(demo_checkpoint), 0, split, "float32", 1 << 22, 16, "cpu"),
              SeedOssStage(str(demo_checkpoint), split, layers, "float32", 1 << 22, 16, "cpu")]
    tokens = torch.tensor([5, 9, 14, 3, 7, 11])
    seq_ids, query_lens, context_lens = ["a", "b"], [4, 2], [0, 0]
    timings = StepTimings(len(stages))

    async def step():
        sent = timings.sent()
        wire = pack(tokens)
        for stage in stages:
            wire = await stage.forward(wire, seq_ids, query_lens, context_lens)
        timings.returned(sent, stamps(wire))
        return sent, time.time(), wire

    sent, received, wire = asyncio.run(step())
    expected = run_stages([load_stage(demo_checkpoint, 0, split), load_stage(demo_checkpoint, split, layers)],
                          tokens, StepBatch(seq_ids, query_lens, context_lens))
    torch.testing.assert_close(unpack(wire), expected)

    marks = stamps(wire)
    assert len(marks) == 2 and all(isinstance(m, StageStamps) for m in marks)
    flat = [sent, *(t for m in marks for t in m)]
    assert flat == sorted(flat)  # sent ≤ entered ≤ unpacked ≤ started ≤ ended ≤ packed, stage after stage
    report = timings.as_dict()
    assert report["steps"] == 1 and all(v >= 0 for v in report["seconds"].values())
    step_total = sum(v for k, v in report["seconds"].items() if k != "engine")
    assert 0 < step_total <= received - sent  # the components partition the step, sent to result
    assert report["seconds"]["stage0_compute"] > 0 and report["seconds"]["stage1_compute"] > 0

    timings.returned(timings.sent(), None)  # a failed step: neither a step nor components, but the engine gap counts
    assert timings.as_dict()["steps"] == 1 and timings.as_dict()["engine_samples"] == 1


def test_same_loop_env_merges_into_the_runtime_env_and_the_user_wins():
    options = same_loop({"num_replicas": 1, "ray_actor_options": {"num_cpus": 1, "runtime_env": {
        "env_vars": {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1", "X": "y"}, "pip": ["a"]}}})
    actor = options["ray_actor_options"]
    assert actor["num_cpus"] == 1 and actor["runtime_env"]["pip"] == ["a"]
    assert actor["runtime_env"]["env_vars"] == {**REPLICA_ENV, "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1", "X": "y"}
    assert same_loop({})["ray_actor_options"]["runtime_env"]["env_vars"] == REPLICA_ENV
