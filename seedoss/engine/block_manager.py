"""KV blocks: per-sequence block tables, reference counts and the automatic prefix cache.

A block holds `block_size` consecutive tokens of a sequence. A *full* block is named by a hash chain over the
tokens up to and including it (and the request's `cache_salt`): two sequences whose first k blocks have the
same tokens have the same first k block hashes, so the second can take the first's blocks instead of computing
them (`adopt`). Blocks are shared by reference count; a block nobody references keeps its contents and its hash
(it stays findable) until the allocator needs it, least recently freed first.

The same class serves both sides of the pipeline: the engine's scheduler keeps one as the accounting mirror of
every stage's cache, and each stage's `PagedKVCache` keeps one for its slots. They run the same operations in
the same order with the same hashes (the engine ships them with each step), so a prefix the engine believes
cached normally is cached in every stage too; where it is not (a restarted or shared stage replica), the stage
reports the sequence missing and the engine recomputes it, so correctness never depends on the two agreeing.

Torch-free on purpose: the engine's accounting must not pay for tensor work.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Hashable, Iterable

from .errors import KVCacheFull

BlockHash = bytes


def hash_block(parent: BlockHash | None, tokens: Iterable[int], salt: str | None = None) -> BlockHash:
    """The hash of a full block: its parent's hash (None for the first block), its token ids, and the salt (only
    the first block carries it; the chain passes it on). 128-bit BLAKE2b: collisions would serve one prompt's KV
    to another, so no fast non-cryptographic hash (Python's `hash` is also not stable for strings across
    processes, and engines on different replicas must agree)."""
    h = hashlib.blake2b(parent or b"\0", digest_size=16)
    h.update(array("q", tokens).tobytes())
    if parent is None and salt:
        h.update(b"\0salt\0" + salt.encode())
    return h.digest()


def hash_blocks(tokens: list[int], block_size: int, salt: str | None, have: list[BlockHash]) -> list[BlockHash]:
    """`have` (the hashes of the first len(have) blocks) extended with the hashes of every further full block of
    `tokens`. Returns `have` itself, grown in place: sequences keep their chain and only hash new blocks."""
    for i in range(len(have), len(tokens) // block_size):
        have.append(hash_block(have[-1] if have else None, tokens[i * block_size:(i + 1) * block_size], salt))
    return have


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("KV cache needs at least one block; raise the KV budget")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self.cached: dict[BlockHash, int] = {}  # hash → the block holding that prefix
        self._free = list(range(num_blocks - 1, -1, -1))  # unreferenced and unnamed: reused first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced, still named: least recent first
        self.tables: dict[Hashable, list[int]] = {}  # by sequence; dict order: least to most recently reserved

    # --- queries -----------------------------------------------------------------------------------------
    def __contains__(self, key: Hashable) -> bool:
        return key in self.tables

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: free ones and cached ones nobody references."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, key: Hashable, total_tokens: int) -> int:
        return max(0, -(-total_tokens // self.block_size) - len(self.tables.get(key, ())))

    def cached_prefix(self, hashes: list[BlockHash]) -> list[int]:
        """The blocks holding the longest cached prefix of this hash chain."""
        blocks = []
        if self.enable_prefix_caching:
            for h in hashes:
                block = self.cached.get(h)
                if block is None:
                    break
                blocks.append(block)
        return blocks

    def adoption_cost(self, blocks: list[int]) -> int:
        """Free blocks that adopting `blocks` uses up: the unreferenced ones leave the evictable pool."""
        return sum(1 for b in blocks if self.ref_counts[b] == 0)

    # --- changes -----------------------------------------------------------------------------------------
    def adopt(self, key: Hashable, blocks: list[int]) -> None:
        """Start `key`'s table with these cached blocks (from `cached_prefix`)."""
        assert not self.tables.get(key), "adopt starts a sequence's table"
        for b in blocks:
            if self.ref_counts[b] == 0:
                del self._evictable[b]
            self.ref_counts[b] += 1
        self.tables[key] = list(blocks)

    def reserve(self, demands: dict[Hashable, int]) -> None:
        """Make room so each sequence can hold `total_tokens` tokens; all or nothing (raises `KVCacheFull`). A
        reserved sequence becomes the most recently used."""
        needed = {k: self.blocks_needed(k, n) for k, n in demands.items()}
        if sum(needed.values()) > self.num_free_blocks:
            raise KVCacheFull(f"KV cache full: need {sum(needed.values())} blocks, {self.num_free_blocks} free of "
                              f"{self.num_blocks}")
        for key, n in needed.items():
            table = self.tables.pop(key, [])
            self.tables[key] = table
            table.extend(self._allocate() for _ in range(n))

    def _allocate(self) -> int:
        if self._free:
            block = self._free.pop()
        else:  # the least recently freed cached block loses its name
            block, _ = self._evictable.popitem(last=False)
            del self.cached[self.block_hash[block]]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def register(self, key: Hashable, hashes: list[BlockHash], start: int = 0) -> list[int]:
        """Name `key`'s blocks start, start+1, … (now full) by `hashes`. A block already named, or a hash that
        already names another block, is left as is. Returns the blocks newly named (for `unregister`)."""
        named = []
        if not self.enable_prefix_caching:
            return named
        table = self.tables[key]
        for i, h in enumerate(hashes, start):
            block = table[i]
            if self.block_hash[block] is None and h not in self.cached:
                self.block_hash[block], self.cached[h] = h, block
                named.append(block)
        return named

    def unregister(self, blocks: Iterable[int]) -> None:
        """Forget these blocks' names (their contents are not what the hash says: a failed forward, a lost stage)."""
        for b in blocks:
            h = self.block_hash[b]
            if h is not None:
                del self.cached[h]
                self.block_hash[b] = None
                if b in self._evictable:
                    del self._evictable[b]
                    self._free.append(b)

    def truncate(self, key: Hashable, num_blocks: int) -> None:
        """Release `key`'s blocks past the first `num_blocks`."""
        table = self.tables[key]
        self._release(table[num_blocks:])
        del table[num_blocks:]

    def replace(self, key: Hashable, index: int) -> tuple[int, int]:
        """Give `key` a private copy of its block `index` (copy on write): returns (old block, new block); the
        caller copies the contents. Needs a free block (`num_free_blocks` > 0)."""
        table = self.tables[key]
        old, table[index] = table[index], self._allocate()
        self._release([old])
        return old, table[index]

    def free(self, key: Hashable) -> None:
        table = self.tables.pop(key, None)
        if table:
            self._release(table)

    def _release(self, blocks: list[int]) -> None:
        # tail first: a sequence's last blocks are the least likely to be shared, so they are evicted first
        for b in reversed(blocks):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                if self.block_hash[b] is None:
                    self._free.append(b)
                else:
                    self._evictable[b] = None
