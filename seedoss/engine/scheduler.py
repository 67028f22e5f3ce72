"""Continuous batching: which tokens of which sequences go into the next micro-batch.

The scheduler owns the KV *accounting*: its `BlockManager` mirrors the block usage every stage will have (all
stages use the same block size; capacity is the smallest stage's block count), so a micro-batch it emits always
fits. Each step, in order: running sequences' decode tokens, running prompts' next chunks, then new admissions
while the token budget and free blocks allow. A new admission first takes the longest prefix of full blocks the
prefix cache holds and only computes the rest (never the whole prompt: the last token is always computed, so
it can be sampled from). The blocks a step fills are named by their hashes at once, so a sequence scheduled
after it (a fork of the same prompt, even in the same micro-batch) takes them: every stage runs its steps in
order, so the blocks are written before they are read.

When a running sequence cannot grow, the most recently admitted idle sequence is preempted: its blocks are
released (the named ones stay cached until evicted) and it goes back to the front of the queue, to be
recomputed from whatever of it is still cached. Sequences already in a micro-batch in flight are skipped, so up
to `Pipeline.micro_batches` disjoint micro-batches can be in the pipeline at once.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from .block_manager import BlockHash, BlockManager
from .sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    context: int  # tokens already cached
    num_new: int  # tokens this step computes
    samples: bool  # the step reaches the sequence's last token, so a new token is sampled
    hash_start: int  # the first block whose name the step ships to the stages
    hashes: list[BlockHash]  # names of blocks hash_start … up to the last block this step fills


@dataclass
class MicroBatch:
    items: list[ScheduledSeq]

    @property
    def seq_ids(self) -> list[str]:
        return [i.seq.seq_id for i in self.items]

    @property
    def num_tokens(self) -> int:
        return sum(i.num_new for i in self.items)

    @property
    def block_hashes(self) -> list[tuple[int, list[BlockHash]]]:
        return [(i.hash_start, i.hashes) for i in self.items]


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_num_seqs: int = 64, max_batched_tokens: int = 512):
        self.blocks, self.block_size = blocks, blocks.block_size
        self.max_num_seqs, self.max_batched_tokens = max_num_seqs, max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.in_flight: set[str] = set()
        self.num_preemptions = 0
        self.prefix_queries = self.prefix_hits = 0  # prompt tokens looked up / found at first admission

    # --- accounting --------------------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return self.blocks.num_free_blocks

    @property
    def kv_usage(self) -> float:
        return self.blocks.usage

    def _schedule(self, seq: Sequence, context: int, num_new: int, hash_start: int) -> ScheduledSeq:
        """Reserve the step's blocks and name those it fills."""
        self.blocks.reserve({seq.seq_id: context + num_new})
        hashes = []
        if self.blocks.enable_prefix_caching:
            hashes = seq.block_hashes(hash_start, (context + num_new) // self.block_size, self.block_size)
            self.blocks.register(seq.seq_id, hashes, hash_start)
        return ScheduledSeq(seq, context, num_new, context + num_new == seq.num_tokens, hash_start, hashes)

    # --- queue management --------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Forget a finished or aborted sequence and release its blocks."""
        self.blocks.free(seq.seq_id)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def reset(self, seq: Sequence) -> None:
        """A stage lost this sequence's cache (or never had the prefix it was told to take): recompute it from
        scratch. Its blocks lose their names (a stage does not hold what they say) and are released; it keeps its
        place in the running queue."""
        if seq.seq_id in self.blocks:
            self.blocks.unregister(self.blocks.tables[seq.seq_id])
            self.blocks.free(seq.seq_id)
        seq.num_computed = 0

    def _preempt(self, victim: Sequence) -> None:
        self.running.remove(victim)
        self.blocks.free(victim.seq_id)
        victim.num_computed, victim.status = 0, Status.WAITING
        self.waiting.appendleft(victim)
        self.num_preemptions += 1
        self.preempted.append(victim)

    def _make_room(self, seq: Sequence, blocks: int) -> bool:
        """Preempt idle sequences admitted after `seq` (newest first) until `blocks` are free."""
        while self.free_blocks < blocks:
            victims = [s for s in reversed(self.running) if s is not seq and s.seq_id not in self.in_flight]
            if not victims or self.running.index(victims[0]) < self.running.index(seq):
                return False
            self._preempt(victims[0])
        return True

    # --- one micro-batch ---------------------------------------------------------------------------------
    def schedule(self, free_slots: int = 1) -> tuple[MicroBatch | None, list[Sequence]]:
        """The next micro-batch (None when nothing can run now) and the sequences preempted to make it.

        `free_slots` is how many more micro-batches may enter the pipeline now; idle running sequences are
        spread evenly over them so every stage gets work.
        """
        self.preempted: list[Sequence] = []
        budget = self.max_batched_tokens
        items: list[ScheduledSeq] = []
        idle = [s for s in self.running if s.seq_id not in self.in_flight]
        share = math.ceil(len(idle) / max(free_slots, 1)) if idle else 0
        for seq in idle:
            if len(items) >= share or budget <= 0:
                break
            if seq not in self.running:  # preempted while making room for an earlier one
                continue
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            needed = self.blocks.blocks_needed(seq.seq_id, seq.num_computed + num_new)
            if needed and not self._make_room(seq, needed):
                if len(self.running) > 1 and seq.seq_id not in self.in_flight:
                    self._preempt(seq)  # nothing newer to evict: step aside until others finish
                continue
            items.append(self._schedule(seq, seq.num_computed, num_new, seq.num_computed // self.block_size))
            budget -= num_new
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = []
            if self.blocks.enable_prefix_caching:  # full blocks only, and never the last token
                cached = self.blocks.cached_prefix(seq.block_hashes(0, (seq.num_tokens - 1) // self.block_size,
                                                                    self.block_size))
            context = len(cached) * self.block_size
            num_new = min(seq.num_tokens - context, budget)
            cost = self.blocks.adoption_cost(cached) + math.ceil((context + num_new) / self.block_size) - len(cached)
            if cost > self.free_blocks:
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = context
                if self.blocks.enable_prefix_caching:
                    self.prefix_queries += seq.num_tokens
                    self.prefix_hits += context
            self.blocks.adopt(seq.seq_id, cached)
            seq.num_computed = context
            items.append(self._schedule(seq, context, num_new, 0))  # names from block 0: a stage may adopt them
            budget -= num_new
        if not items:
            return None, self.preempted
        self.in_flight.update(i.seq.seq_id for i in items)
        return MicroBatch(items), self.preempted

    def complete(self, batch: MicroBatch, succeeded: bool) -> None:
        """A micro-batch left the pipeline; on success its tokens are now cached everywhere."""
        for item in batch.items:
            self.in_flight.discard(item.seq.seq_id)
            if succeeded and item.seq.num_computed == item.context:
                item.seq.num_computed = item.context + item.num_new

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)
