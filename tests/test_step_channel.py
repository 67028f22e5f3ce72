"""The direct step connection between a lane's engine and a stage replica (deployments/step_channel.py), with the
real demo stage behind the server: the same numbers as the stage itself, errors by name, no service without the
token, and a lost or cancelled connection that never answers the wrong step."""

from __future__ import annotations

import asyncio

import pytest
import torch

from seedoss.config import SeedOssConfig
from seedoss.deployments.faults import StageConnectionLost, lost_replica, replica_lost
from seedoss.deployments.step_channel import (
    PREFIX, DirectSwitch, ReplicaPool, StageUnreachable, StepClient, StepFailed, StepServer, header_step, step_header,
)
from seedoss.deployments.timing import StageStamps
from seedoss.engine import LocalStageExecutor
from seedoss.engine.errors import MissingSequenceCache
from seedoss.loader import load_stage

KV_BYTES, BLOCK = 8 << 20, 16


def executor(checkpoint, dtype: str, start: int = 0, end: int | None = None) -> LocalStageExecutor:
    """Layers [start, end) of the checkpoint (all by default) as a stage."""
    end = SeedOssConfig.from_pretrained(checkpoint).num_hidden_layers if end is None else end
    return LocalStageExecutor(lambda: load_stage(str(checkpoint), start, end, dtype=dtype), KV_BYTES, BLOCK)


def served(stage: LocalStageExecutor, fail_on: int | None = None, delay_s: float = 0.0) -> StepServer:
    """A StepServer over `stage`; a step whose first token is `fail_on` raises there; each step first waits
    `delay_s`."""
    async def step(x, seq_ids, query_lens, context_lens, block_hashes, alone=False):
        await asyncio.sleep(delay_s)
        if fail_on is not None and int(x.flatten()[0]) == fail_on:
            raise ValueError("this step fails here")
        clock = []
        y = await stage.forward(x, seq_ids, query_lens, context_lens, block_hashes=block_hashes, clock=clock)
        return y, StageStamps(clock[0], clock[0], clock[0], clock[1], clock[1])

    async def prefill(x, lengths):
        await asyncio.sleep(delay_s)
        return await cache_less(stage, x, lengths)

    return StepServer(step, prefill, MissingSequenceCache)


async def cache_less(stage: LocalStageExecutor, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """The stage's cache-less forward of sequences of `lengths` packed in `x` (as SeedOssStage's batcher runs it)."""
    return await stage.forward(list(x.split(lengths)), list(range(len(lengths))), lengths, [0] * len(lengths),
                               use_cache=False)


STEPS = [  # (tokens, seq_ids, query_lens, context_lens): two prompts, then decode steps
    (torch.arange(5, 26), ["a", "b"], [12, 9], [0, 0]),
    (torch.tensor([7, 8]), ["a", "b"], [1, 1], [12, 9]),
    (torch.tensor([3, 4]), ["a", "b"], [1, 1], [13, 10]),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_steps_over_the_connection_are_the_stage_s_own_numbers(demo_checkpoint, dtype):
    remote, local = executor(demo_checkpoint, dtype), executor(demo_checkpoint, dtype)

    async def run():
        server = served(remote)
        client = StepClient(await server.address("127.0.0.1"), "stage-0")
        try:
            for tokens, seq_ids, q, c in STEPS:
                got, stamp = await client.step(tokens, step_header(seq_ids, q, c, None), MissingSequenceCache)
                want = await local.forward(tokens, seq_ids, q, c)
                assert got.dtype == want.dtype and torch.equal(got, want)
                assert len(stamp) == len(StageStamps._fields) and stamp[2] <= stamp[3]
        finally:
            client.close()
            server.close()

    asyncio.run(run())


def test_a_prompt_step_sent_alone_runs_on_the_prompt_threads_with_the_same_numbers(demo_checkpoint):
    """`alone` travels in the step header: a step of 16+ new tokens that its lane sent with no other in flight runs
    on the stage's `prompt_threads`; a decode step, or a prompt sent beside another step, keeps the replica's one
    thread; and the outputs are the stage's own either way."""
    from seedoss.deployments.stage import PROMPT_STEP_TOKENS, SeedOssStage

    before = torch.get_num_threads()
    layers = SeedOssConfig.from_pretrained(demo_checkpoint).num_hidden_layers
    stage = SeedOssStage(str(demo_checkpoint), 0, layers, "float32", KV_BYTES, BLOCK, "cpu", threads=1,
                         prompt_threads=2)
    local = executor(demo_checkpoint, "float32")
    seen = []
    stage.executor.stage.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    prompt = PROMPT_STEP_TOKENS + 4
    steps = [  # (tokens, seq_ids, query_lens, context_lens, alone, threads the forward should run on)
        (torch.arange(5, 5 + prompt), ["a"], [prompt], [0], True, 2),
        (torch.tensor([7]), ["a"], [1], [prompt], True, 1),
        (torch.arange(9, 9 + prompt), ["b"], [prompt], [0], False, 1),
        (torch.arange(3, 3 + prompt), ["c"], [prompt], [0], True, 2),
    ]

    async def run():
        server = StepServer(stage._channel_step, stage._channel_prefill, MissingSequenceCache)
        client = StepClient(await server.address("127.0.0.1"), "stage-0")
        try:
            for tokens, seq_ids, q, c, alone, threads in steps:
                got, _ = await client.step(tokens, step_header(seq_ids, q, c, None, alone=alone), MissingSequenceCache)
                torch.testing.assert_close(got, await local.forward(tokens, seq_ids, q, c))
                assert seen[-1] == threads, (q, alone, seen)
        finally:
            client.close()
            server.close()

    try:
        asyncio.run(run())
    finally:
        torch.set_num_threads(before)


def test_block_hashes_travel_as_they_are():
    hashes = [(0, [bytes(range(16)), b"\xff" * 16]), (3, [])]
    assert header_step(step_header(["x", "y"], [33, 1], [0, 40], hashes)) == (["x", "y"], [33, 1], [0, 40], hashes)
    assert header_step(step_header(["x"], [1], [2], None))[3] is None


def test_missing_cache_and_failed_steps_come_back_and_the_connection_stays_usable(demo_checkpoint):
    stage = executor(demo_checkpoint, "float32")

    async def run():
        server = served(stage, fail_on=99)
        client = StepClient(await server.address("127.0.0.1"), "stage-0")
        try:
            with pytest.raises(MissingSequenceCache) as missing:  # a decode step for a sequence never prefilled
                await client.step(torch.tensor([5]), step_header(["nobody"], [1], [30], None), MissingSequenceCache)
            assert missing.value.seq_ids == ["nobody"]
            with pytest.raises(StepFailed, match="this step fails here"):
                await client.step(torch.tensor([99, 1]), step_header(["z"], [2], [0], None), MissingSequenceCache)
            tokens, seq_ids, q, c = STEPS[0]
            got, _ = await client.step(tokens, step_header(seq_ids, q, c, None), MissingSequenceCache)
            assert got.shape[0] == len(tokens)
            assert len(client._idle) == 1  # all three steps used the one connection
        finally:
            client.close()
            server.close()

    asyncio.run(run())


def test_no_step_without_the_token_and_no_big_frame_before_it(demo_checkpoint):
    stage = executor(demo_checkpoint, "float32")

    async def run():
        server = served(stage)
        address = await server.address("127.0.0.1")
        intruder = StepClient({**address, "token": "0" * 32}, "stage-0")
        tokens, seq_ids, q, c = STEPS[0]
        with pytest.raises(StageConnectionLost):
            await intruder.step(tokens, step_header(seq_ids, q, c, None), MissingSequenceCache)
        reader, writer = await asyncio.open_connection(address["host"], address["port"])
        writer.write(PREFIX.pack(1 << 30, 0))  # a 1 GiB "hello": refused before anything is read into memory
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
        writer.close()
        assert stage.cache_stats()["sequences"] == 0  # nothing ran
        server.close()

    asyncio.run(run())


def test_a_replica_that_goes_away_is_a_lost_replica_and_a_refused_one_unreachable(demo_checkpoint):
    stage = executor(demo_checkpoint, "float32")

    async def run():
        server = served(stage, delay_s=0.5)
        address = await server.address("127.0.0.1")
        client = StepClient(address, "stage-7")
        await client.open()
        tokens, seq_ids, q, c = STEPS[0]
        step = asyncio.ensure_future(client.step(tokens, step_header(seq_ids, q, c, None), MissingSequenceCache))
        await asyncio.sleep(0.1)
        server.close()  # the replica goes away mid-step: its connections end
        with pytest.raises(StageConnectionLost) as lost:
            await asyncio.wait_for(step, 10)
        assert replica_lost(lost.value) and lost_replica(lost.value) == "stage-7"
        await asyncio.sleep(0.6)
        with pytest.raises(StageUnreachable):  # nothing listens there any more
            await StepClient(address, "stage-7").open()

    asyncio.run(run())


def test_a_cancelled_step_closes_its_connection_so_no_later_step_reads_its_reply(demo_checkpoint):
    stage = executor(demo_checkpoint, "float32")
    reference = executor(demo_checkpoint, "float32")

    async def run():
        server = served(stage, delay_s=0.3)
        client = StepClient(await server.address("127.0.0.1"), "stage-0")
        try:
            tokens, seq_ids, q, c = STEPS[0]
            slow = asyncio.ensure_future(client.step(tokens, step_header(seq_ids, q, c, None), MissingSequenceCache))
            await asyncio.sleep(0.1)
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            assert client._idle == []  # the cancelled step's connection is gone, not reused
            other = (torch.arange(40, 47), ["c"], [7], [0])
            got, _ = await client.step(other[0], step_header(*other[1:], None), MissingSequenceCache)
            assert torch.equal(got, await reference.forward(*other))
        finally:
            client.close()
            server.close()

    asyncio.run(run())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_cache_less_forward_over_the_connection_is_the_stage_s_own(demo_checkpoint, dtype):
    half = SeedOssConfig.from_pretrained(demo_checkpoint).num_hidden_layers // 2
    ids, lengths = torch.arange(3, 30), [5, 12, 10]

    async def run():
        servers = [served(executor(demo_checkpoint, dtype, 0, half)), served(executor(demo_checkpoint, dtype, half))]
        clients = [StepClient(await s.address("127.0.0.1"), f"stage-{k}") for k, s in enumerate(servers)]
        try:
            x, want = ids, ids
            for k, (start, end) in enumerate([(0, half), (half, None)]):  # ids in, then hidden states
                x = await clients[k].prefill(x, lengths)
                want = await cache_less(executor(demo_checkpoint, dtype, start, end), want, lengths)
                assert x.dtype == getattr(torch, dtype) and torch.equal(x, want)
                assert servers[k].served == {"steps": 0, "prefills": 1}
        finally:
            for client, server in zip(clients, servers):
                client.close()
                server.close()

    asyncio.run(run())


def test_the_pool_sends_each_forward_to_the_least_busy_replica_and_drops_a_lost_one(demo_checkpoint):
    stage = executor(demo_checkpoint, "float32")
    ids, lengths = torch.arange(3, 12), [9]

    async def run():
        servers = [served(stage, delay_s=0.3), served(stage)]
        addresses = [{**await s.address("127.0.0.1"), "replica": f"stage-{k}"} for k, s in enumerate(servers)]
        named = []  # the replicas "Serve" named, in turn

        async def resolve():
            named.append(addresses[len(named) % 2])
            return named[-1]

        pool = ReplicaPool(resolve)
        first = await pool.client()
        assert first.replica == "stage-0" and len(named) == 1
        busy = asyncio.ensure_future(first.prefill(ids, lengths))
        await asyncio.sleep(0.1)
        assert await pool.client() is first  # asked again only after RESOLVE_S
        pool.resolved_at = float("-inf")  # RESOLVE_S later: Serve names the other replica
        second = await pool.client()
        assert second.replica == "stage-1" and len(named) == 2  # stage-0 is busy
        await busy
        servers[1].close()  # stage-1 goes away: the pool sees its connection closed and never sends it a forward
        await asyncio.sleep(0.1)
        assert (await pool.client()).replica == "stage-0" and len(named) == 3  # and asks Serve again at once
        assert list(pool.clients) == ["stage-0"]
        with pytest.raises(StageConnectionLost):  # a client that still tries it learns at once
            await second.prefill(ids, lengths)
        pool.drop("stage-0")
        assert pool.clients == {} and pool.resolved_at == float("-inf")
        servers[0].close()

    asyncio.run(run())


def test_an_unreachable_replica_switches_to_serve_calls_for_a_while_not_for_good():
    assert not DirectSwitch(False)
    switch = DirectSwitch(True)
    assert switch
    switch.unreachable()
    assert not switch  # Serve calls now
    switch.off_until -= 3600  # SERVE_CALLS_S later
    assert switch
