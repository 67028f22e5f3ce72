"""How calls reach stage replicas: lanes and KV affinity.

A *lane* is one Generation replica (one engine) plus the stage replicas its sequences' KV caches live on. Lane k is
the Generation replica of rank k (Serve keeps ranks contiguous, 0..N-1, and tells a replica its rank through
`reconfigure`). Every stage call of lane k carries the session id ``lane-k``; the stage deployments route with
`LaneRouter`, which sends lane k to the k-th (mod n) of the stage's replicas ordered by replica id — a pure
function of the replica set that every caller computes alike, so all steps of a lane, from any process, reach the
same replica of each stage, and with as many stage replicas as lanes each lane has its own. When the replica set
changes (scale out or in, a crash), some lanes move: their next step misses the cache there and the engine
recomputes those sequences (`MissingSequenceCache`), so correctness never depends on routing.

Calls without a lane (the heads' cache-less forwards) go to the least loaded replica: any replica can serve them.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time

import torch
from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter

from seedoss.engine import StageUnavailable
from seedoss.engine.errors import MissingSequenceCache
from seedoss.services.errors import NotFound

from .faults import CallTimeout, RetryPolicy, StageConnectionLost, Timeouts, backpressure, replica_lost, within
from .step_channel import (
    RESOLVE_S, SERVE_CALLS_S, DirectSwitch, ReplicaPool, StageUnreachable, StepClient, step_header,
)
from .stream_channel import DirectSource, StreamLinkLost, StreamReceiver, StreamUnreachable
from .timing import StageStamps, StepTimings, now
from .wire import pack, stamps, unpack

log = logging.getLogger(__name__)
LANE_PREFIX = "lane-"


def lane_session(lane: int) -> str:
    return f"{LANE_PREFIX}{lane}"


class LaneRouter(ConsistentHashRouter):
    """Strict lane → replica affinity for calls with a lane session id; least-loaded for the rest. Subclasses
    Serve's consistent-hash router for its session-sticky request loop (a request keeps its chosen replica and
    waits out backpressure there instead of spilling to another replica, where it would miss the cache)."""

    def _lookup_ranked_replicas(self, routing_key: str):
        if not routing_key.startswith(LANE_PREFIX) or not self._replica_set_snapshot:
            return super()._lookup_ranked_replicas(routing_key)
        replicas = sorted(self._replica_set_snapshot, key=lambda r: r.unique_id)
        return [replicas[int(routing_key[len(LANE_PREFIX):]) % len(replicas)]]

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        session = pending_request.metadata.session_id if pending_request is not None else None
        if not (session and session.startswith(LANE_PREFIX)):
            return [candidate_replicas] if candidate_replicas else []  # the framework picks the shortest queue
        return await super().choose_replicas(candidate_replicas, pending_request)


def detached(fn, *args):
    """`fn(*args)` outside the current Serve request: handle calls made in it are not children of the request that
    happens to be current, so Serve does not cancel them when that client goes away. The engine's steps and frees
    serve every running sequence; its loop task was started inside the first request and inherits its context."""
    return contextvars.Context().run(fn, *args)


def chained(handles: list, method: str, x, *args):
    """`method` on each stage in turn, each stage's DeploymentResponse passed straight into the next stage's call.
    Returns the last stage's response (made detached). What Ray 2.60 does with it (read in its source, measured as
    `hop{k}` in deployments/timing.py): the caller's router waits until stage k-1's result is ready, then routes
    stage k's call with its ObjectRef — so each hop still passes the caller's event loop; a result of up to 100 KB
    (Ray's `max_direct_call_object_size`, e.g. a decode step's hidden states) comes back inline to the caller and
    is inlined into the next call, a larger one (a prefill chunk) stays in the object store and goes from stage to
    stage without the caller."""
    def chain():
        y = x
        for handle in handles:
            y = getattr(handle, method).remote(y, *args)
        return y

    return detached(chain)


# Ray's max_direct_call_object_size: a result up to this size travels inline with the call's reply.
BY_VALUE_MAX_BYTES = 100 * 1024


def wire_row_bytes(config, dtype: str) -> int:
    """Bytes of one token's hidden state between stages (`config`: the checkpoint's SeedOssConfig)."""
    return config.hidden_size * (2 if dtype in ("bfloat16", "float16") else 4)


class StageChain:
    """The stage deployments in pipeline order.

    How hidden states travel depends on their size (`handles(tokens)`): a call whose hidden states are small (a
    decode step, a few short texts) goes over gRPC by value, which costs less than a Ray actor call; a large one (a
    prefill chunk, a big classify batch) goes by reference, as a Ray call whose result stays in the object store:
    the array is not copied through gRPC messages, and its ObjectRef goes to the next stage without the caller
    receiving the array (bench/RESULTS.md, issues 15 and 18)."""

    def __init__(self, handles: list, retry: RetryPolicy, stage_timeout_s: float, row_bytes: int,
                 direct: bool = False):
        """`row_bytes`: one token's hidden state on the wire (hidden size × the element size); `direct`: cache-less
        forwards go over connections to the stage replicas (`ReplicaPool`, deployments/step_channel.py)."""
        self.retry, self.row_bytes, self.direct = retry, row_bytes, DirectSwitch(direct)
        self.num_stages = len(handles)
        self.timeout_s = stage_timeout_s * self.num_stages  # a forward through every stage
        self._by_value = [h.options(_by_reference=False) for h in handles]
        self._by_reference = [h.options(_by_reference=True) for h in handles]
        self._pools = [ReplicaPool(functools.partial(detached, h.channel.remote)) for h in self._by_value]

    def by_reference(self, tokens: int) -> bool:
        """Whether a call carrying `tokens` rows of hidden states goes by reference."""
        return tokens * self.row_bytes > BY_VALUE_MAX_BYTES

    def handles(self, tokens: int) -> list:
        """The stage handles (any replicas) for a call carrying `tokens` rows."""
        return self._by_reference if self.by_reference(tokens) else self._by_value

    def for_lane(self, lane: int) -> dict[bool, list]:
        """`lane`'s stage handles, by `by_reference(tokens)`."""
        return {by_ref: [h.options(session_id=lane_session(lane)) for h in handles]
                for by_ref, handles in ((False, self._by_value), (True, self._by_reference))}

    async def prefill(self, sequences: list[list[int]]) -> torch.Tensor:
        """Cache-less forward of whole sequences → final hidden states [sum(len), hidden]; any replica serves it,
        and it is sent again while a stage replica is lost (see `RetryPolicy`)."""
        lengths = [len(s) for s in sequences]
        ids = torch.tensor([t for s in sequences for t in s])
        tokens = pack(ids)

        async def attempt():
            if self.direct:
                try:
                    return await self._prefill_direct(ids, lengths)
                except StageUnreachable as e:
                    log.warning("%s; cache-less forwards go as Serve calls for %gs", e, SERVE_CALLS_S)
                    self.direct.unreachable()
                    for pool in self._pools:
                        pool.close()
            response = chained(self.handles(sum(lengths)), "prefill", tokens, lengths)
            try:
                return unpack(await response)
            except asyncio.CancelledError:  # timed out, or the caller went away
                response.cancel()
                raise

        try:
            return await self.retry.call(attempt, "cache-less stage forward", self.timeout_s)
        except CallTimeout:
            raise StageUnavailable(f"a stage forward took longer than {self.timeout_s:g}s") from None
        except Exception as e:
            if replica_lost(e):
                raise StageUnavailable("a stage replica is unavailable") from None
            raise

    async def _prefill_direct(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        for pool in self._pools:
            client = await pool.client()
            try:
                x = await client.prefill(x, lengths)
            except StageConnectionLost:
                pool.drop(client.replica)  # the retry goes to another replica, or asks Serve again
                raise
        return x


class ServePipeline:
    """The engine's `Pipeline` over the stage deployments, for one lane. A step whose stage replica was lost is
    sent again under the app's retry policy (a retried step is safe: a stage truncates a sequence to the step's
    context); when the policy gives up, `StageUnavailable` fails the step's requests. `direct`: steps go over the
    lane's own connections to its stage replicas (deployments/step_channel.py), not as Serve calls."""

    head_executor = None

    def __init__(self, chain: StageChain, lane: int, num_blocks: int, block_size: int, direct: bool = False):
        self.chain, self.num_blocks, self.block_size = chain, num_blocks, block_size
        self.direct = DirectSwitch(direct)
        self.num_stages = self.micro_batches = chain.num_stages
        self.timings = StepTimings(self.num_stages)
        self.in_flight = 0  # steps sent and not yet answered
        self._clients: list[StepClient] = []
        self._resolved_at = float("-inf")  # when Serve last named the lane's replicas
        self.set_lane(lane)

    @classmethod
    async def connect(cls, chain: StageChain, lane: int, direct: bool = False) -> "ServePipeline":
        infos = [await h.info.remote() for h in chain.for_lane(lane)[False]]
        return cls(chain, lane, min(i["num_blocks"] for i in infos), infos[0]["block_size"], direct)

    def set_lane(self, lane: int) -> None:
        self.lane = lane
        self._handles = self.chain.for_lane(lane)  # by whether a step goes by reference
        self._drop_clients()

    async def run(self, tokens, seq_ids, query_lens, context_lens, block_hashes=None):
        step = (seq_ids, query_lens, context_lens, block_hashes)
        retries = self.chain.retry.retries(f"lane {self.lane} step")
        self.in_flight += 1
        try:
            return await self._run(tokens, step, retries)
        finally:
            self.in_flight -= 1

    async def _run(self, tokens, step, retries):
        while True:
            sent, marks = self.timings.sent(), None
            try:
                async with asyncio.timeout(self.chain.timeout_s):  # no task per step, unlike wait_for
                    x, marks = await (self._direct_step if self.direct else self._serve_step)(tokens, *step)
                return x
            except MissingSequenceCache as e:  # Ray re-raises the replica's exception as a subclass of it
                raise MissingSequenceCache(getattr(e, "cause", e).seq_ids) from None
            except StageUnreachable as e:
                log.warning("lane %d: %s; its steps go as Serve calls for %gs", self.lane, e, SERVE_CALLS_S)
                self.direct.unreachable()
                self._drop_clients()
                continue
            except TimeoutError:
                raise StageUnavailable(f"a stage step took longer than {self.chain.timeout_s:g}s") from None
            except Exception as e:
                if backpressure(e):
                    raise StageUnavailable("a stage is at capacity") from None
                delay = retries.delay_after(e)
                if delay is None:
                    if replica_lost(e):
                        raise StageUnavailable("a stage replica is unavailable") from None
                    raise
                self._drop_clients()  # a direct step asks Serve again where the lane's replicas are
            finally:
                self.timings.returned(sent, marks)
            await asyncio.sleep(delay)

    async def _serve_step(self, tokens, seq_ids, query_lens, context_lens, block_hashes):
        """One try as Serve calls → (outputs, the stages' stamps)."""
        handles = self._handles[self.chain.by_reference(sum(query_lens))]
        response = chained(handles, "forward", pack(tokens), seq_ids, query_lens, context_lens, block_hashes)
        try:
            result = await response
        except asyncio.CancelledError:  # timed out
            response.cancel()
            raise
        return unpack(result), stamps(result)

    async def _direct_step(self, tokens, *step):
        """One try over the lane's connections → (outputs, the stages' stamps)."""
        header, x, marks = step_header(*step, alone=self.in_flight == 1), tokens, []
        for client in await self._step_clients():
            x, stamp = await client.step(x, header, MissingSequenceCache)
            marks.append(StageStamps(*stamp))
        return x, marks

    async def _step_clients(self) -> list[StepClient]:
        """The lane's step connections, asked of Serve (each replica's `channel()` through the lane's handles)
        when there are none or they are older than RESOLVE_S; kept while the replicas stay the same."""
        if self._clients and time.monotonic() - self._resolved_at < RESOLVE_S:
            return self._clients
        addresses = [await detached(handle.channel.remote) for handle in self._handles[False]]
        if [c.address for c in self._clients] != addresses:
            self._drop_clients()
            self._clients = [StepClient(a, a["replica"]) for a in addresses]
            for client in self._clients:  # Serve just reached these replicas: a refused connection is the network
                await client.open()
        self._resolved_at = time.monotonic()
        return self._clients

    def _drop_clients(self) -> None:
        for client in self._clients:
            client.close()
        self._clients = []

    def _free(self, seq_ids):
        for handle in self._handles[False]:
            handle.free.remote(list(seq_ids))

    def free(self, seq_ids):
        detached(self._free, seq_ids)  # also when called while a cancelled request unwinds (abort)


class Heads:
    """The gateway's handles of the head services, by task ("generate", "classify", "tag", "qa"), and the one way
    it calls them: unary calls (idempotent) are sent again while their replica was lost, and generation streams
    continue on another lane when theirs is lost (`GenerationStream`). Which lane a request reaches is the Generation
    deployment's router's choice: `prefix_routing.PrefixAffinityRouter` (with `lanes.prefix_affinity`, more than one
    lane) or Serve's power-of-two-choices, both on ongoing requests per Generation replica: a request is a sequence
    (or `n`), so a lane's ongoing requests track its running + waiting sequences, the same load the lane autoscaler
    reads."""

    def __init__(self, handles: dict, retry: RetryPolicy, timeouts: Timeouts, local: dict | None = None,
                 receiver: StreamReceiver | None = None):
        """`handles`: a Serve handle per task; `local`: heads that run in this replica (`TaskHead`s, with
        `AppConfig.head_placement: gateway`), called as coroutines: no hop to retry; `receiver`: where generation
        streams send their chunks (`AppConfig.stream_transport: direct`); None: as Serve stream items."""
        self.local, self.receiver = set(local or {}), receiver
        self.handles, self.retry, self.timeouts = {**handles, **(local or {})}, retry, timeouts

    def get(self, task: str):
        handle = self.handles.get(task)
        if handle is None:
            raise NotFound(f"no {task} head is deployed in this application", param="task")
        return handle

    def deployed(self) -> dict:
        return {task: h for task, h in self.handles.items() if h is not None}

    async def call(self, task: str, body: dict, method: str | None = None):
        handle = self.get(task)
        target = getattr(handle, method) if method else handle
        if task in self.local:  # in this replica: its stage forwards retry on their own
            return await within(target(body), self.timeouts.head_s, f"{task} call")

        async def once():
            response = target.remote(body)
            try:
                return await response
            except asyncio.CancelledError:  # the client went away: stop the work (Serve would not, once sent)
                response.cancel()
                raise

        return await self.retry.call(once, f"{task} call", self.timeouts.head_s)

    async def ready(self, task: str) -> None:
        """Returns once `task`'s head answers a forward through the whole stage chain."""
        head = self.get(task)
        await (head.ready() if task in self.local else head.ready.remote())

    def stream(self, body: dict) -> "GenerationStream":
        return GenerationStream(self.get("generate"), body, self.retry, self.timeouts.head_s, self.receiver)


class GenerationStream:
    """`Generation.stream(body)` that outlives its lane. It remembers what it relayed (the stream's id, each
    choice's token ids, which choices finished); when the lane's replica is lost — killed, crashed, or removed by a
    scale-in before the stream finished — it asks another lane to resume after exactly those tokens, so the client
    sees one stream with no token repeated or missing. Greedy and seeded requests continue as if nothing happened
    (the engine replays penalties, seeded draws, detokenizer and stop-string state).

    With a `receiver` the chunks come over a connection from the Generation replica (`Generation.relay`,
    deployments/stream_channel.py); without one, or for a while after that connection could not be made or broke,
    as Serve stream items (`Generation.stream`)."""

    def __init__(self, handle, body: dict, retry: RetryPolicy, chunk_timeout_s: float,
                 receiver: StreamReceiver | None = None):
        self.handle, self.body, self.chunk_timeout_s, self.receiver = handle, body, chunk_timeout_s, receiver
        self.id: str | None = None
        self.delivered: dict[int, list[int]] = {}
        self.finished: set[int] = set()
        self._retries = retry.retries("generation stream")
        self._started = now()
        self._stream = self._start(None)

    def _start(self, resume: dict | None):
        if self.receiver is not None and self.receiver.direct:
            return DirectSource(self.handle, self.receiver, self.body, resume)
        stream = self.handle.options(stream=True).stream
        return stream.remote(self.body) if resume is None else stream.remote(self.body, resume)

    def _resume(self) -> dict | None:
        if self.id is None:
            return None  # nothing relayed yet: start afresh
        return {"id": self.id, "choices": {i: {"token_ids": ids, "finished": i in self.finished}
                                           for i, ids in self.delivered.items()}}

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        while True:
            try:
                async with asyncio.timeout(self.chunk_timeout_s):  # no task per chunk, unlike wait_for
                    chunk = await self._stream.__anext__()
            except StopAsyncIteration:
                raise
            except TimeoutError:
                self._stream.cancel()
                raise CallTimeout(f"no generation output for {self.chunk_timeout_s:g}s") from None
            except (StreamUnreachable, StreamLinkLost) as e:  # the connection, not the lane: Serve streams instead
                log.warning("generation stream %s: %s; streams go as Serve stream items for %gs", self.id, e,
                            SERVE_CALLS_S)
                self.receiver.direct.unreachable()
                self._stream = self._start(self._resume())
                continue
            except Exception as e:
                delay = self._retries.delay_after(e)
                if delay is None:
                    raise
                log.warning("generation stream %s lost its lane (%s); resuming on another", self.id, type(e).__name__)
                await asyncio.sleep(delay)
                self._stream = self._start(self._resume())
                continue
            if "timing" in chunk:  # the Generation replica was started with SEEDOSS_STREAM_TIMING=1
                chunk["timing"].update(gateway_start=self._started, gateway=now())
            self.id = chunk["id"]
            for c in chunk["choices"]:
                self.delivered.setdefault(c["index"], []).extend(c["token_ids"])
                if c.get("finish_reason") is not None:
                    self.finished.add(c["index"])
            return chunk

    def cancel(self) -> None:
        self._stream.cancel()
