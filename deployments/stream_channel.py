"""Generation streams over connections of their own: chunks go from the Generation replica that runs a stream to the
gateway replica that relays it, without a Serve stream item per chunk.

Why: at 32 streams a Serve stream item costs the Generation replica ~30% of its CPU samples (serializing and
reporting each item) and the gateway ~35% (receiving them), one item per stream per token (py-spy profiles in
bench/RESULTS.md, issue 15). A chunk written to a socket costs a JSON encoding, and a step's chunks for one gateway
go out as one frame.

How (`AppConfig.stream_transport: direct`, the default):

- the gateway still asks Serve for every stream: `Generation.relay(body, resume, to)` is a unary call routed like
  any other (lanes, prefix affinity) and ongoing for the stream's whole life, so Serve's queue lengths, backpressure
  and autoscaling see the stream as before, and cancelling it (the client went away) stops the generation. `to`
  names where the chunks go: the gateway replica's `StreamReceiver` (its node's address, a port, a random token
  that travels only in that call) and a stream key of the gateway's choosing;
- the Generation replica keeps one connection per gateway replica (`StreamSender`); the call returns the number of
  chunks it sent, so the gateway knows when it has them all (the reply and the socket are not ordered);
- errors (invalid requests, engine failures) come back as the call's exception, as on the Serve path; a lost
  Generation replica fails the call, and `GenerationStream` resumes on another lane after the tokens it received;
- a Generation replica that cannot connect to the gateway (a network policy that lets only Ray's ports through)
  raises `StreamUnreachable` before it generates anything, and a connection that breaks mid-stream `StreamLinkLost`:
  the gateway then goes on with Serve streams for SERVE_CALLS_S (`DirectSwitch`), resuming after what it received.
  The receiver knows which streams a connection carried by the chunks it brought: a stream none of whose chunks had
  arrived when its connection died learns it from its relay (whose next send fails at once), or at the chunk timeout.

Frames are deployments/step_channel.py's (JSON header, no payload): ``{"chunks": [[key, chunk], ...]}``.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time

from .step_channel import SERVE_CALLS_S, DirectSwitch, accepted, connect, read_frame, write_frame


class StreamUnreachable(ConnectionError):
    """The Generation replica could not connect to the gateway's receiver (nothing was generated)."""


class StreamLinkLost(ConnectionError):
    """The connection to the gateway broke while the stream ran (the generation stopped there)."""


class StreamReceiver:
    """A gateway replica's listener for the chunks of the streams it relays: one inbox (a queue) per open stream."""

    def __init__(self, host: str):
        self.host, self.token = host, secrets.token_hex(16)
        self.direct = DirectSwitch(True)  # off for a while after a Generation replica could not reach it
        self.server: asyncio.base_events.Server | None = None
        self._starting = asyncio.Lock()
        self._keys = itertools.count()
        self._inboxes: dict[str, asyncio.Queue] = {}

    async def address(self) -> dict:
        async with self._starting:
            if self.server is None:
                self.server = await asyncio.start_server(self._serve, self.host, 0)
        return {"host": self.host, "port": self.server.sockets[0].getsockname()[1], "token": self.token}

    def open(self) -> tuple[str, asyncio.Queue]:
        """A new stream key and the inbox its chunks arrive in."""
        key = format(next(self._keys), "x")
        self._inboxes[key] = inbox = asyncio.Queue()
        return key, inbox

    def close(self, key: str) -> None:
        """Chunks for `key` that still arrive are dropped."""
        self._inboxes.pop(key, None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        keys: set[str] = set()  # the streams this connection carried
        try:
            if not await accepted(reader, self.token):
                return
            while True:
                header, _ = await read_frame(reader, max_payload=0)
                for key, chunk in header["chunks"]:
                    inbox = self._inboxes.get(key)
                    if inbox is not None:
                        inbox.put_nowait(chunk)
                        keys.add(key)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, KeyError, TypeError):
            pass  # the replica went away, or sent what no replica of ours sends
        finally:
            writer.close()
            for key in keys:  # streams still open: chunks they were sent may be lost (`DirectSource` decides)
                inbox = self._inboxes.get(key)
                if inbox is not None:
                    inbox.put_nowait(LINK_LOST)


class StreamLink:
    """A Generation replica's connection to one gateway replica. Chunks sent in one turn of the event loop (a step's
    outputs wake every stream's relay at once) go out as one frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self._pending: list[list] = []
        self._watch = asyncio.get_running_loop().create_task(self._watch_eof())

    @classmethod
    async def open(cls, to: dict) -> "StreamLink":
        try:
            return cls(*await connect(to))
        except (OSError, TimeoutError) as e:
            raise StreamUnreachable(f"cannot connect to the gateway at {to['host']}:{to['port']}: {e}") from None

    async def _watch_eof(self) -> None:
        """The gateway sends nothing after the hello: any read ending means it closed the connection or went away."""
        try:
            await self.reader.read()
        except Exception:
            pass
        self.writer.close()

    @property
    def closed(self) -> bool:
        return self.writer.is_closing()

    def send(self, key: str, chunk: dict) -> None:
        if self.closed:
            raise StreamLinkLost("the connection to the gateway closed")
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append([key, chunk])

    def _flush(self) -> None:
        chunks, self._pending = self._pending, []
        if chunks and not self.closed:
            write_frame(self.writer, {"chunks": chunks})

    async def drain(self) -> None:
        """Waits while the gateway reads slower than chunks come."""
        try:
            await self.writer.drain()
        except ConnectionError as e:
            raise StreamLinkLost(f"the connection to the gateway broke: {e}") from None

    async def flush(self) -> None:
        """Writes what is pending now; raises StreamLinkLost if it could not be written."""
        self._flush()
        await self.drain()
        if self.closed:
            raise StreamLinkLost("the connection to the gateway closed")


class StreamSender:
    """A Generation replica's links, one per gateway replica that has asked it for a stream. A gateway it could not
    connect to is not tried again for SERVE_CALLS_S (that gateway takes Serve stream items meanwhile): on a network
    that drops the packets, streams queued behind the first would otherwise each wait out the connect timeout."""

    def __init__(self):
        self._links: dict[tuple, StreamLink] = {}
        self._unreachable: dict[tuple, float] = {}  # gateway → when a connection to it last failed
        self._opening = asyncio.Lock()  # streams that start together share one new link

    async def link(self, to: dict) -> StreamLink:
        key = (to["host"], to["port"], to["token"])
        link = self._links.get(key)
        if link is not None and not link.closed:
            return link
        async with self._opening:
            link = self._links.get(key)
            if link is None or link.closed:
                if time.monotonic() - self._unreachable.get(key, float("-inf")) < SERVE_CALLS_S:
                    raise StreamUnreachable(f"the gateway at {to['host']}:{to['port']} was unreachable just now")
                try:
                    self._links[key] = link = await StreamLink.open(to)
                except StreamUnreachable:
                    self._unreachable[key] = time.monotonic()
                    raise
            for other in [k for k, v in self._links.items() if v.closed]:  # gateways that went away
                del self._links[other]
        return link


class DirectSource:
    """One try of a stream over the gateway's receiver: `relay` called through `handle`, chunks from the inbox."""

    def __init__(self, handle, receiver: StreamReceiver, body: dict, resume: dict | None):
        self.handle, self.receiver, self.body, self.resume = handle, receiver, body, resume
        self.key: str | None = None
        self.inbox: asyncio.Queue | None = None
        self.response = self._waiter = None
        self.received, self.sent = 0, None  # chunks taken from the inbox; how many the replica sent, once known
        self.cancelled = self.link_lost = False

    async def _start(self) -> None:
        address = await self.receiver.address()
        if self.cancelled:
            raise asyncio.CancelledError
        self.key, self.inbox = self.receiver.open()
        self.response = self.handle.relay.remote(self.body, self.resume, {**address, "key": self.key})
        self._waiter = asyncio.ensure_future(self._ended())

    async def _ended(self) -> None:
        """Puts the call's outcome in the inbox after the chunks that came before it: the number sent, or the error."""
        try:
            outcome = await self.response
        except BaseException as e:  # noqa: BLE001 — handed to the reader, who raises it
            outcome = e
        self.inbox.put_nowait(_Ended(outcome))

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        if self.inbox is None:
            await self._start()
        while self.sent is None or self.received < self.sent:
            item = await self.inbox.get()
            if item is LINK_LOST:  # after every chunk the connection carried; the call's outcome says more
                self.link_lost = True
            elif isinstance(item, _Ended):
                if isinstance(item.outcome, BaseException):
                    self.receiver.close(self.key)
                    raise item.outcome
                self.sent = item.outcome
            else:
                self.received += 1
                return item
            if self.link_lost and self.sent is not None and self.received < self.sent:
                self.receiver.close(self.key)
                raise StreamLinkLost(f"{self.sent - self.received} chunks were lost with the connection")
        self.receiver.close(self.key)
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True
        if self.response is not None:
            self.response.cancel()
            self._waiter.cancel()
            self.receiver.close(self.key)


LINK_LOST = object()  # in an inbox: the connection that carried the stream's chunks ended


class _Ended:
    __slots__ = ("outcome",)

    def __init__(self, outcome):
        self.outcome = outcome
