"""Continuous batching: which tokens of which sequences go into the next micro-batch.

The scheduler owns the KV *accounting*: it mirrors the block usage every stage will have (all stages use the
same block size; capacity is the smallest stage's block count), so a micro-batch it emits always fits. Each
step, in order: running sequences' decode tokens, running prompts' next chunks, then new admissions while the
token budget and free blocks allow. When a running sequence cannot grow, the most recently admitted idle
sequence is preempted: its cache is dropped and it goes back to the front of the queue to be recomputed.
Sequences already in a micro-batch in flight are skipped, so up to `num_stages` disjoint micro-batches can be
in the pipeline at once.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from .sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    context: int  # tokens already cached
    num_new: int  # tokens this step computes
    samples: bool  # the step reaches the sequence's last token, so a new token is sampled


@dataclass
class MicroBatch:
    items: list[ScheduledSeq]

    @property
    def seq_ids(self) -> list[str]:
        return [i.seq.seq_id for i in self.items]

    @property
    def num_tokens(self) -> int:
        return sum(i.num_new for i in self.items)


class Scheduler:
    def __init__(self, num_blocks: int, block_size: int, *, max_num_seqs: int = 64, max_batched_tokens: int = 512):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.max_num_seqs, self.max_batched_tokens = max_num_seqs, max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.in_flight: set[str] = set()
        self._blocks: dict[str, int] = {}
        self.num_preemptions = 0

    # --- accounting --------------------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return self.num_blocks - sum(self._blocks.values())

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.free_blocks / self.num_blocks

    def _extra_blocks(self, seq: Sequence, tokens: int) -> int:
        return max(0, math.ceil(tokens / self.block_size) - self._blocks.get(seq.seq_id, 0))

    def _grow(self, seq: Sequence, tokens: int) -> None:
        self._blocks[seq.seq_id] = max(self._blocks.get(seq.seq_id, 0), math.ceil(tokens / self.block_size))

    # --- queue management --------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Forget a finished or aborted sequence and release its blocks."""
        self._blocks.pop(seq.seq_id, None)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def reset(self, seq: Sequence) -> None:
        """The stages lost this sequence's cache: recompute it from scratch (keeps its place and blocks)."""
        seq.num_computed = 0

    def _preempt(self, victim: Sequence) -> None:
        self.running.remove(victim)
        self._blocks.pop(victim.seq_id, None)
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
            remaining = seq.num_tokens - seq.num_computed
            num_new = min(remaining, budget)
            needed = self._extra_blocks(seq, seq.num_computed + num_new)
            if needed and not self._make_room(seq, needed):
                if len(self.running) > 1 and seq.seq_id not in self.in_flight:
                    self._preempt(seq)  # nothing newer to evict: step aside until others finish
                continue
            self._grow(seq, seq.num_computed + num_new)
            items.append(ScheduledSeq(seq, seq.num_computed, num_new, num_new == remaining))
            budget -= num_new
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            num_new = min(seq.num_tokens, budget)
            needed = self._extra_blocks(seq, num_new)
            if needed > self.free_blocks:
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            self._grow(seq, num_new)
            items.append(ScheduledSeq(seq, 0, num_new, num_new == seq.num_tokens))
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
