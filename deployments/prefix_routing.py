"""Prefix-aware lane choice: which Generation replica (lane) a generation request goes to.

Each lane's engine and stages keep a prefix cache of full KV blocks named by a hash chain
(`seedoss/engine/block_manager.py`); a request whose leading blocks a lane already holds skips computing them. Serve's
default power-of-two-choices ignores that, so two chats sharing a long system prompt can land on different lanes and
both compute it. `PrefixAffinityRouter` sends a request to the lane that was recently sent the longest run of its
leading blocks, unless that lane carries more than `imbalance` ongoing requests above the least loaded lane.

Why not Ray's `PrefixCacheAffinityRouter` (ray.llm, the anchor): it matches prompt *text* (`.prompt` / `.messages`
attributes) in a prefix tree held by a detached actor that every routing decision calls with a blocking `ray.get`
on the router's event loop. We route `prompt_token_ids` dicts, and the engine's own block names are the exact unit
of reuse (a 15-token overlap reuses nothing; a different `cache_salt` reuses nothing), so this router keys on the
prompt's block-name chain, computed with the engine's `hash_blocks`, and keeps its state in the caller's process:
no actor hop per request. Each gateway replica learns from the requests it routed itself; with several gateway
replicas a prefix may settle on one lane per gateway, which costs one extra prefill per lane, never a wrong token
(a lane's cache is only ever an optimisation). What it keeps from Ray's: a load bound gates affinity, and a prompt
whose prefix no lane holds goes to the lane holding the fewest blocks (its "smallest tenant"), so distinct prefixes
spread over the lanes instead of piling up where random choice put them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter

from seedoss.engine.block_manager import BlockHash, hash_blocks


class PrefixIndex:
    """Which block names each lane was recently sent: per lane an LRU of at most `capacity` names (bounded state).
    A name hashes its whole prefix, so a lane holding the i-th name of a prompt's chain was sent its first i+1
    blocks. Names are recorded tail first, so a lane forgets a prompt's tail before its head, as the engine's cache
    evicts."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._lanes: dict[Hashable, OrderedDict[BlockHash, None]] = {}

    def record(self, lane: Hashable, names: list[BlockHash]) -> None:
        lru = self._lanes.setdefault(lane, OrderedDict())
        for name in reversed(names):
            lru[name] = None
            lru.move_to_end(name)
        while len(lru) > self.capacity:
            lru.popitem(last=False)

    def matched(self, lane: Hashable, names: list[BlockHash]) -> int:
        """How many leading blocks of `names` the lane was sent."""
        lru = self._lanes.get(lane)
        if lru:
            for i in range(len(names) - 1, -1, -1):
                if names[i] in lru:
                    return i + 1
        return 0

    def held(self, lane: Hashable) -> int:
        return len(self._lanes.get(lane, ()))

    def retain(self, lanes: Iterable[Hashable]) -> None:
        """Forget lanes that are gone (scaled in, crashed): a replacement starts with an empty cache."""
        keep = set(lanes)
        for lane in [lane for lane in self._lanes if lane not in keep]:
            self.forget(lane)

    def forget(self, lane: Hashable) -> None:
        self._lanes.pop(lane, None)


def choose_lane(names: list[BlockHash], loads: dict[Hashable, int], index: PrefixIndex, imbalance: int,
                min_blocks: int) -> Hashable | None:
    """The lane for a prompt with block names `names`, given each available lane's ongoing requests, or None to
    leave the choice to power-of-two-choices. Only lanes within `imbalance` requests of the least loaded count; of
    those, the one sent the longest prefix (at least `min_blocks` blocks) wins, ties to the less loaded; when none
    matches that much, the one holding the fewest blocks (a fresh prefix goes where it evicts least)."""
    if not names or not loads:
        return None
    least = min(loads.values())
    eligible = [lane for lane, load in loads.items() if load - least <= imbalance]
    best = max(eligible, key=lambda lane: (index.matched(lane, names), -loads[lane]))
    if index.matched(best, names) >= min_blocks:
        return best
    return min(eligible, key=lambda lane: (index.held(lane), loads[lane]))


class PrefixAffinityRouter(PowerOfTwoChoicesRequestRouter):
    """Serve request router of the Generation deployment (`lanes.prefix_affinity`): `choose_lane` over the
    replicas' ongoing requests as Serve's routers measure them (the queue-length cache, probed when unknown); calls
    without a prompt (`stats`, `ready`) and prompts shorter than a block take power-of-two-choices. A resumed stream
    (`GenerationStream` after its lane was lost) carries the same body, so it goes to a lane holding its prefix if
    one is left, else like any fresh prompt: the lost lane was dropped from the index with the replica."""

    def initialize_state(self, block_size: int = 16, imbalance: int = 8, min_blocks: int = 1,
                         blocks_per_lane: int = 65536, **kwargs):
        super().initialize_state(**kwargs)
        self._block_size, self._imbalance, self._min_blocks = block_size, imbalance, min_blocks
        self._index = PrefixIndex(blocks_per_lane)

    def _names(self, pending_request) -> list[BlockHash]:
        body = pending_request.args[0] if pending_request is not None and pending_request.args else None
        ids = body.get("prompt_token_ids") if isinstance(body, dict) else None
        if not ids:
            return []
        return hash_blocks(list(ids), self._block_size, body.get("cache_salt"), [])

    async def _loads(self, replicas) -> dict:
        """Ongoing requests per replica that can take one more (a full replica is no candidate)."""
        loads, unknown = {}, []
        for r in replicas:
            q = self._replica_queue_len_cache.get(r.replica_id) if self._use_replica_queue_len_cache else None
            if q is None:
                unknown.append(r)
            elif q < r.max_ongoing_requests:
                loads[r.replica_id] = q
        if unknown:
            for r, q in await self._probe_queue_lens(unknown, 0):
                if q is not None and q < r.max_ongoing_requests:
                    loads[r.replica_id] = q
        return loads

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        names = self._names(pending_request)
        if names and candidate_replicas:
            lane = choose_lane(names, await self._loads(candidate_replicas), self._index, self._imbalance,
                               self._min_blocks)
            if lane is not None:
                return [[r for r in candidate_replicas if r.replica_id == lane]]
        return await super().choose_replicas(candidate_replicas, pending_request)

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        """Serve calls this once a replica accepted the request (always, outside Ray Client: strict
        `max_ongoing_requests`), whichever policy chose it: the lane now holds the prompt's blocks."""
        names = self._names(pending_request)
        if names:
            self._index.record(replica_id, names)

    def update_replicas(self, replicas) -> None:
        super().update_replicas(replicas)
        self._index.retain(r.replica_id for r in replicas)

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self._index.forget(replica_id)
