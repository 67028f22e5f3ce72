"""Direct connections for stage calls: generation steps from a lane's engine to each of its stage replicas, and the
heads' cache-less forwards to any replica of each stage.

A Serve handle call between two replicas costs 2.5-5.9 ms round trip and 3.4-6.9 ms of CPU (caller and callee) on
our 2-core boxes; the same array over a TCP connection between the same two processes 0.05-0.09 ms
(`python -m bench.hop_cost`, bench/RESULTS.md, issue 15). A generation step makes three such hops (to each stage and
back), at one stream every token. With `AppConfig.stage_transport: direct` a lane's steps (`StepClient`) and the
heads' batches (`ReplicaPool`) go over connections of their own; Serve still places, scales, health-checks and
replaces the replicas, carries the rest (frees, `info`), and tells callers where each replica listens: a stage
replica's `channel()`, called through the lane's handle, names the replica Serve routes the lane to (through a
handle without a lane, the replica Serve picks for a head). So:

- a connection that breaks (the replica died) is a lost replica (`StageConnectionLost`, retried under the app's
  `RetryPolicy`); the next try asks Serve again, reaches the replacement, and the engine recomputes the sequences it
  misses (`MissingSequenceCache`), as on the Serve path;
- every `RESOLVE_S` the engine asks again, so a lane that Serve routes to another replica after a scale-out or
  scale-in moves there too (within that interval, frees still go through Serve; a replica whose sequences were
  never freed evicts them when its cache fills);
- the replica listens on its node's address with a random token, given out only through that Serve call: a client
  must present it first, and frames are JSON headers plus raw tensor bytes, never pickles.

A frame is a 8-byte prefix (header length, payload length), a JSON header and the payload bytes. One connection
carries one step at a time (a step that times out or is cancelled closes its connection), so replies never need
matching; the engine keeps a few idle connections per replica, one per micro-batch in flight.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import struct
import time
from collections.abc import Awaitable, Callable

import numpy as np
import torch

from .faults import StageConnectionLost

PREFIX = struct.Struct("!II")  # header bytes, payload bytes
HELLO_MAX_BYTES = 1024  # what a client may send before it has shown the token
HEADER_MAX_BYTES = 64 << 20
PAYLOAD_MAX_BYTES = 1 << 31
RESOLVE_S = 5.0
SERVE_CALLS_S = 60.0  # after a replica Serve named could not be connected to: Serve calls this long, then try again
CONNECT_TIMEOUT_S = 5.0


async def read_frame(reader: asyncio.StreamReader, max_header: int = HEADER_MAX_BYTES,
                     max_payload: int = PAYLOAD_MAX_BYTES) -> tuple[dict, bytes]:
    header_bytes, payload_bytes = PREFIX.unpack(await reader.readexactly(PREFIX.size))
    if header_bytes > max_header or payload_bytes > max_payload:
        raise ConnectionError(f"frame of {header_bytes} + {payload_bytes} bytes is over the limit")
    header = json.loads(await reader.readexactly(header_bytes))
    return header, (await reader.readexactly(payload_bytes) if payload_bytes else b"")


def write_frame(writer: asyncio.StreamWriter, header: dict, payload: bytes | memoryview = b"") -> None:
    encoded = json.dumps(header).encode()
    writer.write(PREFIX.pack(len(encoded), len(payload)) + encoded)
    if payload:
        writer.write(payload)


async def connect(address: dict) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the listener at `address` (host, port, token), the token sent first. Raises OSError or
    TimeoutError (after CONNECT_TIMEOUT_S)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(address["host"], address["port"]),
                                            CONNECT_TIMEOUT_S)
    write_frame(writer, {"token": address["token"]})
    return reader, writer


async def accepted(reader: asyncio.StreamReader, token: str) -> bool:
    """Whether a new connection's first frame (at most HELLO_MAX_BYTES, no payload) shows `token`."""
    hello, _ = await read_frame(reader, HELLO_MAX_BYTES, 0)
    return hmac.compare_digest(str(hello.get("token", "")).encode(), token.encode())


def tensor_frame(t: torch.Tensor) -> tuple[dict, memoryview]:
    """A tensor's header fields and its bytes (bfloat16 as its raw 16-bit pattern)."""
    t = t.detach().cpu().contiguous()
    dtype = str(t.dtype).removeprefix("torch.")
    array = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
    return {"dtype": dtype, "shape": list(t.shape)}, memoryview(array).cast("B")


def frame_tensor(header: dict, payload: bytes) -> torch.Tensor:
    dtype = header["dtype"]
    array = np.frombuffer(payload, dtype=np.int16 if dtype == "bfloat16" else np.dtype(dtype))
    t = torch.from_numpy(array.copy()).view(header["shape"])  # own the memory: the payload is immutable bytes
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def step_header(seq_ids, query_lens, context_lens, block_hashes, alone: bool = False) -> dict:
    """`alone`: the lane has no other step in flight (a stage may then give a prompt more threads)."""
    return {"seq_ids": list(seq_ids), "query_lens": list(query_lens), "context_lens": list(context_lens),
            "alone": alone,
            "block_hashes": None if block_hashes is None else
            [[start, [h.hex() for h in hashes]] for start, hashes in block_hashes]}


def header_step(header: dict) -> tuple:
    hashes = header["block_hashes"]
    return (header["seq_ids"], header["query_lens"], header["context_lens"],
            None if hashes is None else [(start, [bytes.fromhex(h) for h in hs]) for start, hs in hashes])


# A step on the stage side: (inputs, seq_ids, query_lens, context_lens, block_hashes, alone=) -> (outputs, its
# StageStamps)
StepFn = Callable[..., Awaitable[tuple[torch.Tensor, tuple]]]


# A cache-less forward on the stage side: (inputs, lengths) -> outputs
PrefillFn = Callable[[torch.Tensor, list[int]], Awaitable[torch.Tensor]]


class StepServer:
    """A stage replica's listener: runs each step a client sends through `step`, and each cache-less forward (a
    frame whose header has `lengths`) through `prefill`, and answers it."""

    def __init__(self, step: StepFn, prefill: PrefillFn, missing: type[Exception]):
        """`missing`: the exception that names sequences this stage holds no cache for (sent back by name)."""
        self.step, self.prefill, self.missing = step, prefill, missing
        self.token = secrets.token_hex(16)
        self.server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.served = {"steps": 0, "prefills": 0}  # answered calls, for the replica's `info`

    async def address(self, host: str) -> dict:
        if self.server is None:
            self.server = await asyncio.start_server(self._serve, host, 0)
        return {"host": host, "port": self.server.sockets[0].getsockname()[1], "token": self.token}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            if not await accepted(reader, self.token):
                return
            while True:
                header, payload = await read_frame(reader)
                try:
                    x = frame_tensor(header, payload)
                    if "lengths" in header:
                        y, reply, kind = await self.prefill(x, header["lengths"]), {}, "prefills"
                    else:
                        y, stamp = await self.step(x, *header_step(header), alone=header.get("alone", False))
                        reply, kind = {"stamp": list(stamp)}, "steps"
                except self.missing as e:
                    write_frame(writer, {"missing": e.seq_ids})
                except Exception as e:  # it failed here: the client raises it, the connection stays usable
                    write_frame(writer, {"error": f"{type(e).__name__}: {e}"})
                else:
                    meta, data = tensor_frame(y)
                    write_frame(writer, {**meta, **reply}, data)
                    self.served[kind] += 1
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, KeyError, TypeError):
            pass  # the client went away, or sent what no client of ours sends
        finally:
            self._writers.discard(writer)
            writer.close()

    def close(self) -> None:
        """Stop listening and end every open connection, so that clients see a lost replica at once (closing the
        listener alone leaves accepted connections open)."""
        if self.server is not None:
            self.server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()


class StepFailed(RuntimeError):
    """The stage ran the step and it failed there (not a lost connection): not retried."""


class StageUnreachable(ConnectionError):
    """A stage replica that Serve just said is there could not be connected to (a network policy between pods
    that lets Ray's ports through and not ours, say): the caller goes on with Serve calls (`DirectSwitch`)."""


class DirectSwitch:
    """Whether calls go over step connections: when configured, except for SERVE_CALLS_S after a replica that Serve
    named could not be connected to (`unreachable`). Then they are tried again: a network that lets only Ray's
    ports through refuses again, but a replica that died between being named and being reached must not cost the
    caller its connections for good."""

    def __init__(self, configured: bool):
        self.configured, self.off_until = configured, float("-inf")

    def __bool__(self) -> bool:
        return self.configured and time.monotonic() >= self.off_until

    def unreachable(self) -> None:
        self.off_until = time.monotonic() + SERVE_CALLS_S


class StepClient:
    """Connections to one stage replica's `StepServer`, one step at a time on each."""

    def __init__(self, address: dict, replica: str):
        self.address, self.replica = address, replica
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.closed = False
        self.in_flight = 0  # calls waiting for their answer (the heads send theirs to the least busy replica)

    async def _connect(self):
        try:
            return await connect(self.address)
        except (OSError, TimeoutError) as e:
            raise StageConnectionLost(self.replica, f"cannot connect to stage replica {self.replica}: {e}") from None

    async def open(self) -> None:
        """One connection, made now (raises StageUnreachable)."""
        try:
            self._idle.append(await self._connect())
        except StageConnectionLost as e:
            raise StageUnreachable(str(e)) from None

    async def step(self, x: torch.Tensor, header: dict, missing: type[Exception]) -> tuple[torch.Tensor, list]:
        """`x` through this stage → (its output, the stage's StageStamps as a list). Raises `missing` for
        sequences the stage lacks, StepFailed for a step that failed there, StageConnectionLost when the replica
        is unreachable."""
        reply, payload = await self._call(x, header)
        if "missing" in reply:
            raise missing(reply["missing"])
        return frame_tensor(reply, payload), reply["stamp"]

    async def prefill(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """The cache-less forward of sequences of `lengths` (their ids or hidden states packed in `x`) through this
        stage. Raises as `step` does."""
        reply, payload = await self._call(x, {"lengths": list(lengths)})
        return frame_tensor(reply, payload)

    def drop_closed(self) -> bool:
        """Drops the idle connections the replica has closed (it went away); whether there were any."""
        alive = [(r, w) for r, w in self._idle if not (r.at_eof() or r.exception() or w.is_closing())]
        for _, writer in set(self._idle) - set(alive):
            writer.close()
        gone, self._idle = len(alive) < len(self._idle), alive
        return gone

    async def _call(self, x: torch.Tensor, header: dict) -> tuple[dict, bytes]:
        self.in_flight += 1
        try:
            self.drop_closed()  # a fresh connection (or its refusal) then says whether the replica is there
            connection = self._idle.pop() if self._idle else await self._connect()
            reader, writer = connection
            meta, data = tensor_frame(x)
            try:
                write_frame(writer, {**header, **meta}, data)
                await writer.drain()
                reply, payload = await read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                writer.close()
                raise StageConnectionLost(self.replica, f"stage replica {self.replica} went away: {e}") from None
            except BaseException:  # cancelled or timed out mid-call: the reply would desynchronize this connection
                writer.close()
                raise
        finally:
            self.in_flight -= 1
        if self.closed:  # replaced while this call ran
            writer.close()
        else:
            self._idle.append(connection)
        if "error" in reply:
            raise StepFailed(f"stage replica {self.replica}: {reply['error']}")
        return reply, payload

    def close(self) -> None:
        self.closed = True
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


class ReplicaPool:
    """Connections to the replicas of one stage that Serve has named to this process, for calls that any replica
    may serve (the heads' cache-less forwards): each goes to the replica with the fewest calls in flight from here.
    Serve is asked again (`resolve`: a `channel()` call through a handle with no lane) every RESOLVE_S, so replicas
    Serve starts join the pool as its router names them; one whose connection breaks leaves it (`drop`)."""

    def __init__(self, resolve: Callable[[], Awaitable[dict]]):
        self.resolve = resolve
        self.clients: dict[str, StepClient] = {}
        self.resolved_at = float("-inf")
        self._resolving = asyncio.Lock()  # one question to Serve at a time: two would open two clients for one

    async def client(self) -> StepClient:
        """The least busy known replica's client (raises StageUnreachable for a replica Serve names and that
        cannot be connected to)."""
        for name, client in list(self.clients.items()):
            if client.drop_closed():  # the replica died or was replaced: not tried again, and Serve is asked now
                self.drop(name)
        async with self._resolving:
            if not self.clients or time.monotonic() - self.resolved_at >= RESOLVE_S:
                address = await self.resolve()
                known = self.clients.get(address["replica"])
                if known is None or known.address != address:
                    client = StepClient(address, address["replica"])
                    await client.open()
                    if known is not None:
                        known.close()
                    self.clients[address["replica"]] = client
                self.resolved_at = time.monotonic()
        return min(self.clients.values(), key=lambda c: c.in_flight)

    def drop(self, replica: str) -> None:
        client = self.clients.pop(replica, None)
        if client is not None:
            client.close()
        self.resolved_at = float("-inf")  # ask Serve at the next call

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        self.clients.clear()
