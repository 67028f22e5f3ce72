"""Generation streams over the gateway's own connections (deployments/stream_channel.py), driven through
`Generation.relay` itself: every chunk exactly once and in order, whichever of the call's reply and the chunks
arrives first; a step's chunks in one frame; nothing delivered without the token; a lost connection is an error,
never a silently short stream; and a gateway that a Generation replica cannot reach gets its streams as Serve
stream items instead. The served path (real model, Serve) is tests/test_serve.py and tests/test_lanes.py."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import pytest

from seedoss.deployments.faults import RetryPolicy
from seedoss.deployments.generation import Generation
from seedoss.deployments.routing import GenerationStream
from seedoss.deployments.step_channel import read_frame
from seedoss.deployments.stream_channel import (
    DirectSource, StreamLink, StreamLinkLost, StreamReceiver, StreamSender, StreamUnreachable,
)

HOST = "127.0.0.1"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def chunks(n: int, stream: str = "s") -> list[dict]:
    return [{"id": stream, "choices": [{"index": 0, "token_ids": [i], "text": f"<{i}>"}]} for i in range(n)]


class Replica:
    """A Generation replica's relay (`Generation.relay`, unbound) over `stream`, called the way a Serve handle
    calls it: `handle.relay.remote(...)` is a task (awaitable, cancellable)."""

    def __init__(self, stream, port: int | None = None):
        self.replica = SimpleNamespace(links=StreamSender(), relayed=0, stream=stream)
        self.port = port  # where the replica connects instead of the receiver's port (a network that refuses it)
        self.relay = self

    def remote(self, body, resume, to):
        to = to if self.port is None else {**to, "port": self.port}
        return asyncio.ensure_future(Generation.relay(self.replica, body, resume, to))


class Calls:
    """A handle whose `relay.remote(body, resume, to)` runs `fn(to)`, a replica's relay written out in the test."""

    def __init__(self, fn):
        self.fn, self.relay = fn, self

    def remote(self, body, resume, to):
        return asyncio.ensure_future(self.fn(to))


async def read_all(source) -> list[dict]:
    return [chunk async for chunk in source]


def test_every_chunk_arrives_once_and_in_order_across_concurrent_streams():
    async def main():
        async def stream(body, resume):
            for chunk in chunks(body["n"], body["name"]):
                yield chunk
                await asyncio.sleep(0)

        receiver, replica = StreamReceiver(HOST), Replica(stream)
        sources = [DirectSource(replica, receiver, {"n": 40 + k, "name": f"s{k}"}, None) for k in range(8)]
        got = await asyncio.gather(*(read_all(s) for s in sources))
        assert got == [chunks(40 + k, f"s{k}") for k in range(8)]
        assert replica.replica.relayed == 8 and len(replica.replica.links._links) == 1  # one connection shared
        assert receiver._inboxes == {}  # every finished stream's key is closed

    run(main())


def test_a_reply_that_comes_before_its_chunks_still_gets_them_all():
    """The replica hands its last chunks to the socket and returns at once: the call's outcome reaches the gateway
    before those chunks do, and the stream must wait for them rather than end short."""
    async def main():
        receiver = StreamReceiver(HOST)
        sender = StreamSender()

        async def relay(to):
            link = await sender.link(to)
            for chunk in chunks(25):
                link.send(to["key"], chunk)  # written on the next turn of the loop, after this returns
            return 25

        assert await read_all(DirectSource(Calls(relay), receiver, {}, None)) == chunks(25)

    run(main())


def test_chunks_sent_in_one_turn_of_the_loop_go_out_as_one_frame():
    async def main():
        frames = []

        async def gateway(reader, writer):
            await read_frame(reader)  # the hello
            while True:
                try:
                    frames.append((await read_frame(reader))[0])
                except asyncio.IncompleteReadError:
                    return

        server = await asyncio.start_server(gateway, HOST, 0)
        link = await StreamLink.open({"host": HOST, "port": server.sockets[0].getsockname()[1], "token": "t"})
        for k in range(32):
            link.send(f"k{k}", {"token_ids": [k]})
        await link.flush()
        link.send("k0", {"token_ids": [99]})
        await link.flush()
        for _ in range(100):
            if len(frames) == 2:
                break
            await asyncio.sleep(0.01)
        assert frames == [{"chunks": [[f"k{k}", {"token_ids": [k]}] for k in range(32)]},
                          {"chunks": [["k0", {"token_ids": [99]}]]}]
        link.writer.close()
        server.close()

    run(main())


def test_no_chunk_is_taken_without_the_token():
    async def main():
        receiver = StreamReceiver(HOST)
        address = await receiver.address()
        key, inbox = receiver.open()
        link = await StreamLink.open({**address, "token": "not-the-token"})
        link.send(key, {"token_ids": [1]})
        for _ in range(200):  # the receiver hangs up; the link sees its end
            if link.closed:
                break
            await asyncio.sleep(0.01)
        assert link.closed and inbox.empty()
        with pytest.raises(StreamLinkLost):
            link.send(key, {"token_ids": [2]})

    run(main())


def test_a_connection_lost_mid_stream_is_an_error_not_a_short_stream():
    async def main():
        receiver = StreamReceiver(HOST)
        sender = StreamSender()

        async def lossy(to):
            link = await sender.link(to)
            for chunk in chunks(2):
                link.send(to["key"], chunk)
            await link.flush()
            await asyncio.sleep(0.2)  # the gateway reads both
            link.writer.transport.abort()  # the connection breaks with the third chunk in it
            return 3

        source = DirectSource(Calls(lossy), receiver, {}, None)
        assert [await source.__anext__(), await source.__anext__()] == chunks(2)
        with pytest.raises(StreamLinkLost, match="1 chunks were lost"):
            await source.__anext__()

        async def endless(body, resume):  # and a relay that goes on sending after the break fails at once
            for chunk in chunks(1000):
                yield chunk
                await asyncio.sleep(0.005)

        replica = Replica(endless)
        source = DirectSource(replica, receiver, {}, None)
        await source.__anext__()
        link, = replica.replica.links._links.values()
        link.writer.transport.abort()
        with pytest.raises(StreamLinkLost):
            await read_all(source)

    run(main())


def test_errors_of_the_relay_are_the_streams_errors_and_cancel_stops_it():
    async def main():
        receiver = StreamReceiver(HOST)

        async def invalid(body, resume):
            raise ValueError("prompt: too long")
            yield  # an async generator, as Generation.stream

        with pytest.raises(ValueError, match="too long"):
            await read_all(DirectSource(Replica(invalid), receiver, {}, None))

        async def slow(body, resume):
            for chunk in chunks(1000):
                yield chunk
                await asyncio.sleep(0.01)

        replica = Replica(slow)
        source = DirectSource(replica, receiver, {}, None)
        await source.__anext__()
        source.cancel()
        await asyncio.sleep(0.05)
        assert source.response.cancelled() and receiver._inboxes == {}

    run(main())


def test_a_gateway_the_replica_cannot_reach_gets_serve_stream_items_instead():
    """The replica is told the receiver's address but its connection is refused (a network that lets only Ray's
    ports through): the stream goes on as Serve stream items, for this and the next streams for a while."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        refused = s.getsockname()[1]  # nothing listens here once closed

    async def main():
        async def stream(body, resume):
            for chunk in chunks(5):
                yield chunk

        class Handle(Replica):
            def options(self, stream: bool):
                assert stream
                return SimpleNamespace(stream=SimpleNamespace(remote=lambda body, *resume: Items(body)))

        class Items:  # a Serve streaming response: async iterator with cancel()
            def __init__(self, body):
                self.items = iter(chunks(5))

            def __aiter__(self):
                return self

            async def __anext__(self):
                try:
                    return next(self.items)
                except StopIteration:
                    raise StopAsyncIteration from None

            def cancel(self):
                pass

        receiver = StreamReceiver(HOST)
        handle = Handle(stream, port=refused)
        got = [c async for c in GenerationStream(handle, {}, RetryPolicy(), 10.0, receiver)]
        assert got == chunks(5) and not receiver.direct and handle.replica.relayed == 0
        to = {**await receiver.address(), "port": refused, "key": "0"}
        with pytest.raises(StreamUnreachable):
            await Generation.relay(handle.replica, {}, None, to)
        # Now something listens there; the replica does not try again for a while (no connect timeout per stream)
        server = await asyncio.start_server(lambda r, w: w.close(), HOST, refused)
        with pytest.raises(StreamUnreachable, match="just now"):
            await handle.replica.links.link(to)
        assert await StreamSender().link(to)  # a replica that has not failed to reach it connects
        server.close()

    run(main())
