"""Paged KV cache of one stage: fixed-size token blocks shared by all sequences, bounded by a byte budget.

Keys and values of the stage's layers live in two preallocated tensors `[layers, blocks * block_size, kv_heads,
head_dim]`; which blocks a sequence owns, which are shared and which full blocks are named by a prefix hash is
the `BlockManager`'s business (seedoss/engine/block_manager.py, the same class the engine's scheduler mirrors
this cache with). A token at position p of a sequence is stored in flat slot
`table[p // block_size] * block_size + p % block_size`. The cache never grows past its budget: `bind` raises
`KVCacheFull` instead, and the engine preempts.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING

import torch

from .engine.block_manager import BlockManager
from .engine.errors import KVCacheFull, MissingSequenceCache

if TYPE_CHECKING:
    from .model import StepBatch


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.blocks = BlockManager(num_blocks, block_size)
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._lengths: dict[Hashable, int] = {}

    @classmethod
    def from_budget(
        cls, budget_bytes: int, num_layers: int, num_kv_heads: int, head_dim: int, *, block_size: int = 16,
        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ) -> "PagedKVCache":
        per_block = 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
        return cls(num_layers, num_kv_heads, head_dim, max(1, budget_bytes // max(per_block, 1)), block_size, dtype, device)

    # --- bookkeeping -------------------------------------------------------------------------------------
    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self.blocks

    @property
    def num_sequences(self) -> int:
        return len(self.blocks.tables)

    def length(self, seq_id: Hashable) -> int:
        return self._lengths.get(seq_id, 0)

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (cached blocks nobody references count as free)."""
        return self.blocks.usage

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_needed(self, seq_id: Hashable, total_tokens: int) -> int:
        return self.blocks.blocks_needed(seq_id, total_tokens)

    def free(self, seq_id: Hashable) -> None:
        self.blocks.free(seq_id)
        self._lengths.pop(seq_id, None)

    def truncate(self, seq_id: Hashable, length: int) -> None:
        """Forget tokens past `length` (a retried step rewrites them). A kept partial block that is named by a
        prefix hash is about to change: shared, it is copied first; private, it loses its name."""
        keep = -(-length // self.block_size)
        self.blocks.truncate(seq_id, keep)
        if length % self.block_size:
            block = self.blocks.tables[seq_id][keep - 1]
            if self.blocks.ref_counts[block] > 1 and self.blocks.num_free_blocks:
                old, new = self.blocks.replace(seq_id, keep - 1)
                src = slice(old * self.block_size, (old + 1) * self.block_size)
                dst = slice(new * self.block_size, (new + 1) * self.block_size)
                self.k[:, dst], self.v[:, dst] = self.k[:, src], self.v[:, src]
            else:
                self.blocks.unregister([block])
        self._lengths[seq_id] = min(self._lengths[seq_id], length)

    def evict_lru(self, blocks: int, keep: set[Hashable]) -> list[Hashable]:
        """Free least-recently-used sequences (never those in `keep`) until `blocks` blocks are free."""
        evicted = []
        for seq_id in list(self.blocks.tables):
            if self.num_free_blocks >= blocks:
                break
            if seq_id not in keep:
                self.free(seq_id)
                evicted.append(seq_id)
        return evicted

    def clear(self) -> None:
        """Drop everything, prefix cache included (what a restarted replica has)."""
        for seq_id in list(self.blocks.tables):
            self.free(seq_id)
        self.blocks.unregister(range(self.num_blocks))

    # --- one step ----------------------------------------------------------------------------------------
    def bind(self, batch: "StepBatch") -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Check the cache holds each sequence's context, make room for the new tokens, name the blocks they
        fill, and return the slot indices (write [T] for the new tokens, read [B, max_kv] for whole contexts)
        and the blocks newly named (to `unregister` should the forward fail).

        A sequence starting from position 0 replaces whatever the cache held for it; one whose cached length is
        longer than its context is truncated (a retried step); one with less cached takes its context from the
        prefix cache when the step ships the hash chain from block 0 and every block of it is cached here (or
        is filled by an earlier sequence of this step: `n` forks), and otherwise raises MissingSequenceCache
        (nothing allocated). Raises KVCacheFull (nothing allocated) when the new tokens do not fit.
        """
        bs, pool = self.block_size, self.blocks
        hashes = batch.block_hashes or [(0, [])] * len(batch.seq_ids)
        adopt: dict[int, int] = {}  # row → blocks of context it takes from the prefix cache
        pending: set[bytes] = set()  # hashes this step names, earlier rows first
        missing, cost = [], 0
        revived_blocks: set[int] = set()  # cached blocks rows adopt (each unreferenced one costs a free block once)
        for row, (s, q, c, (start, chain)) in enumerate(zip(batch.seq_ids, batch.query_lens, batch.context_lens,
                                                            hashes)):
            if c == 0:
                self.free(s)
            elif self.length(s) > c:
                self.truncate(s, c)
            elif self.length(s) < c:
                n = c // bs
                if not (start == 0 and c % bs == 0 and len(chain) >= n
                        and all(h in pending or h in pool.cached for h in chain[:n])):
                    missing.append(s)
                    continue
                self.free(s)
                adopt[row] = n
                revived = {pool.cached[h] for h in chain[:n] if h in pool.cached} - revived_blocks
                cost += pool.adoption_cost(list(revived))
                revived_blocks |= revived
            pending.update(chain)
            cost += -(-(c + q) // bs) - (adopt.get(row) or len(pool.tables.get(s, ())))
        if missing:
            raise MissingSequenceCache(missing)
        if cost > pool.num_free_blocks:
            raise KVCacheFull(f"KV cache full: need {cost} blocks, {pool.num_free_blocks} free of {self.num_blocks}")
        # adopt what is cached already before anything allocates (an allocation may evict an unreferenced block)
        early = {row for row, n in adopt.items()
                 if len(pool.cached_prefix(hashes[row][1][:n])) == n}
        for row in early:
            pool.adopt(batch.seq_ids[row], pool.cached_prefix(hashes[row][1][:adopt[row]]))
        named = []
        for row, (s, q, c, (start, chain)) in enumerate(zip(batch.seq_ids, batch.query_lens, batch.context_lens,
                                                            hashes)):
            if row in adopt and row not in early:  # a prefix an earlier row of this step fills
                blocks = pool.cached_prefix(chain[:adopt[row]])
                if len(blocks) < adopt[row]:  # an earlier row's allocation evicted part of it
                    pool.unregister(named)
                    raise MissingSequenceCache([s])
                pool.adopt(s, blocks)
            pool.reserve({s: c + q})
            self._lengths[s] = c + q
            full = (c + q) // bs
            named += pool.register(s, chain[:full - start], start)
        read = self.slot_table(batch.seq_ids, batch.max_kv)
        write = read[batch.token_rows, batch.positions]
        return write.to(self.k.device), read.to(self.k.device), named

    def slot_table(self, seq_ids: list[Hashable], length: int) -> torch.Tensor:
        """[len(seq_ids), length] flat slot index of positions [0, length) of each sequence. A sequence's
        positions past its reserved blocks map to slots of block 0: callers read only up to its length."""
        blocks = -(-length // self.block_size)
        tables = self.blocks.tables
        table = torch.tensor([(t := tables[s][:blocks]) + [0] * (blocks - len(t)) for s in seq_ids])
        pos = torch.arange(length)
        return table[:, pos // self.block_size] * self.block_size + pos % self.block_size
