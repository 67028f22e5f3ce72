"""Paged KV cache of one stage: fixed-size token blocks shared by all sequences, bounded by a byte budget.

Keys and values of the stage's layers live in two preallocated tensors `[layers, blocks * block_size, kv_heads,
head_dim]`; a sequence owns a list of blocks (its block table). A token at position p of a sequence is stored in
flat slot `table[p // block_size] * block_size + p % block_size`. The cache never grows past its budget:
`reserve` raises `KVCacheFull` instead, and the engine preempts.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch


class KVCacheFull(RuntimeError):
    """Not enough free blocks for the requested tokens; nothing was allocated."""


class MissingSequenceCache(LookupError):
    """This stage does not hold the cached context a step assumed (restart, other replica, eviction).

    `seq_ids` lists the affected sequences; the engine re-sends their whole context (recompute).
    """

    def __init__(self, seq_ids: list[Hashable]):
        super().__init__(f"stage holds no KV cache for sequence(s) {seq_ids}; re-send their context")
        self.seq_ids = list(seq_ids)

    def __reduce__(self):  # survive pickling between processes with seq_ids intact
        return type(self), (self.seq_ids,)


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
        if num_blocks < 1:
            raise ValueError("KV cache needs at least one block; raise the KV budget")
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[Hashable, list[int]] = {}
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
        return seq_id in self._tables

    @property
    def num_sequences(self) -> int:
        return len(self._tables)

    def length(self, seq_id: Hashable) -> int:
        return self._lengths.get(seq_id, 0)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_needed(self, seq_id: Hashable, total_tokens: int) -> int:
        have = len(self._tables.get(seq_id, ()))
        return max(0, -(-total_tokens // self.block_size) - have)

    def reserve(self, demands: dict[Hashable, int]) -> None:
        """Make room so each sequence can hold `total_tokens` tokens; all or nothing."""
        needed = {s: self.blocks_needed(s, n) for s, n in demands.items()}
        if sum(needed.values()) > len(self._free):
            raise KVCacheFull(
                f"KV cache full: need {sum(needed.values())} blocks, {len(self._free)} free of {self.num_blocks}"
            )
        for seq_id, n in needed.items():
            table = self._tables.pop(seq_id, [])
            self._tables[seq_id] = table  # re-inserted: dict order is least- to most-recently used
            table.extend(self._free.pop() for _ in range(n))
            self._lengths.setdefault(seq_id, 0)

    def set_length(self, seq_id: Hashable, length: int) -> None:
        self._lengths[seq_id] = length

    def truncate(self, seq_id: Hashable, length: int) -> None:
        """Forget tokens past `length` (their blocks return to the pool)."""
        table = self._tables[seq_id]
        keep = -(-length // self.block_size)
        self._free.extend(reversed(table[keep:]))
        del table[keep:]
        self._lengths[seq_id] = min(self._lengths[seq_id], length)

    def free(self, seq_id: Hashable) -> None:
        table = self._tables.pop(seq_id, None)
        self._lengths.pop(seq_id, None)
        if table:
            self._free.extend(reversed(table))

    def evict_lru(self, blocks: int, keep: set[Hashable]) -> list[Hashable]:
        """Free least-recently-used sequences (never those in `keep`) until `blocks` blocks are free."""
        evicted = []
        for seq_id in list(self._tables):
            if len(self._free) >= blocks:
                break
            if seq_id not in keep:
                self.free(seq_id)
                evicted.append(seq_id)
        return evicted

    def clear(self) -> None:
        for seq_id in list(self._tables):
            self.free(seq_id)

    def slot_table(self, seq_ids: list[Hashable], length: int) -> torch.Tensor:
        """[len(seq_ids), length] flat slot index of positions [0, length) of each sequence. A sequence's
        positions past its reserved blocks map to slots of block 0: callers read only up to its length."""
        blocks = -(-length // self.block_size)
        table = torch.tensor([(t := self._tables[s][:blocks]) + [0] * (blocks - len(t)) for s in seq_ids])
        pos = torch.arange(length)
        return table[:, pos // self.block_size] * self.block_size + pos % self.block_size
