"""BlockManager: the KV cache's fixed-size blocks, their reference counts, and the prefix cache.

A sequence's keys and values live in the blocks of its block table, `block_size` tokens each. A full
block is keyed by a hash chained over every token up to its end, so two sequences that share a prefix
map it to the same blocks (reference-counted, never written again). Freed blocks keep their contents and
stay findable until they are reused, least recently freed first.

Where it can, a sequence's blocks are consecutive in memory: a new sequence starts at a run of blank blocks
(free, holding nothing the prefix cache keeps) long enough for its whole length, found next-fit, and grows
into the block after its last. Attention then reads its context as one stream rather than as blocks at
scattered addresses, which on CPUs costs up to 2x in read bandwidth (BENCHMARKS.md, "KV blocks in
address-ordered runs"). Blank blocks always precede the cached ones in the eviction order, so taking them
out of order leaves the prefix cache's order as it was.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from kiln.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hashes: list[bytes | None] = [None] * num_blocks
        # Blocks nobody references, in eviction order (front first). Cached blocks among them can be
        # revived by a prefix hit until they reach the front and are reused.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}  # block hash -> block holding those tokens
        # 1 where a block is blank (free and uncached): runs of them are found by bytearray.find, in C.
        self._blank = bytearray(b"\x01") * num_blocks
        self._num_blank = num_blocks  # so that a pool with no blank block left skips the searches
        self._cursor = 0  # where the search for a new sequence's run starts (next-fit)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some sequence (cached but unreferenced blocks count as free)."""
        return 1 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---------------------------------------------------------------------------------- prefix cache

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached prefix of `seq`'s tokens; at least one token is left over,
        since computing it is what yields the logits of the next token."""
        if not self.enable_prefix_caching:
            return []
        self._hash_full_blocks(seq)
        blocks: list[int] = []
        for block_hash in seq.block_hashes:
            block = self._cached.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        if len(blocks) * self.block_size >= seq.num_tokens:
            blocks.pop()
        return blocks

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that `seq` has filled with computed tokens, so later prompts can share them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        self._hash_full_blocks(seq)
        for index in range(seq.num_cached_blocks, num_full):
            block, block_hash = seq.block_table[index], seq.block_hashes[index]
            if block_hash not in self._cached:  # else another block already holds these tokens
                self._cached[block_hash] = block
                self._block_hashes[block] = block_hash
        seq.num_cached_blocks = max(seq.num_cached_blocks, num_full)

    def _hash_full_blocks(self, seq: Sequence) -> None:
        size = self.block_size
        while len(seq.block_hashes) < seq.num_tokens // size:
            start = len(seq.block_hashes) * size
            parent = seq.block_hashes[-1] if seq.block_hashes else seq.cache_salt
            tokens = array("q", seq.token_ids[start : start + size]).tobytes()
            seq.block_hashes.append(hashlib.blake2b(parent + tokens, digest_size=16).digest())

    # ------------------------------------------------------------------------------------ allocation

    def allocate(
        self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] | None = None
    ) -> int | None:
        """Extend `seq`'s block table to hold its computed tokens plus `num_new_tokens`; None (and no
        change) if too few blocks are free. `cached_blocks` (a `cached_prefix`) become a new sequence's
        first blocks. Returns how many prefix-cached tokens those blocks hold (0 without them): the engine,
        which alone advances `num_computed_tokens`, counts them as computed."""
        cached_blocks = cached_blocks or []
        if cached_blocks:
            assert not seq.block_table and seq.num_computed_tokens == 0
        num_cached_tokens = len(cached_blocks) * self.block_size
        num_owned = len(seq.block_table) + len(cached_blocks)
        num_needed = max(
            self.blocks_for(seq.num_computed_tokens + num_cached_tokens + num_new_tokens) - num_owned, 0
        )
        num_revived = sum(1 for block in cached_blocks if self._ref_counts[block] == 0)
        if num_needed + num_revived > len(self._free):
            return None
        for block in cached_blocks:
            if self._ref_counts[block] == 0:
                del self._free[block]
            self._ref_counts[block] += 1
        if cached_blocks:
            seq.block_table = list(cached_blocks)
            seq.num_cached_blocks = len(cached_blocks)
        for _ in range(num_needed):
            seq.block_table.append(self._next_block(seq))
        return num_cached_tokens

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks (cached blocks stay findable). Its KV is gone: a preempted sequence
        recomputes from scratch, which the engine records by resetting its `num_computed_tokens`."""
        # Last blocks first, so a prefix outlives its continuations in the eviction order.
        for block in reversed(seq.block_table):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free[block] = None
                if self._block_hashes[block] is None:  # nothing worth keeping: reuse it first
                    self._free.move_to_end(block, last=False)
                    self._blank[block] = 1
                    self._num_blank += 1
        seq.block_table = []
        seq.num_cached_blocks = 0

    def _next_block(self, seq: Sequence) -> int:
        """A free block for `seq`'s next one: the block after its last if blank, else the start of a blank
        run with room for the rest of the sequence (or a shorter one), else any blank block, else the least
        recently freed cached block."""
        table = seq.block_table
        if table:
            after = table[-1] + 1
            if after < self.num_blocks and self._blank[after]:
                return self._take(after)
        want = max(self.blocks_for(seq.max_total_tokens) - len(table), 1)
        for length in dict.fromkeys((want, min(want, 8), 1)):
            start = self._find_blank_run(length) if length <= self._num_blank else -1
            if start >= 0:
                self._cursor = start + length
                return self._take(start)
        return self._take_free_block()

    def _find_blank_run(self, length: int) -> int:
        """First block of `length` blank blocks at or after the cursor, wrapping around; -1 if none."""
        run = b"\x01" * length
        start = self._blank.find(run, self._cursor)
        if start < 0:
            start = self._blank.find(run, 0, min(self._cursor + length - 1, self.num_blocks))
        return start

    def _take(self, block: int) -> int:
        del self._free[block]
        self._blank[block] = 0
        self._num_blank -= 1
        self._ref_counts[block] = 1
        return block

    def _take_free_block(self) -> int:
        block, _ = self._free.popitem(last=False)
        self._num_blank -= self._blank[block]
        self._blank[block] = 0
        block_hash = self._block_hashes[block]
        if block_hash is not None:  # evict it from the prefix cache
            if self._cached.get(block_hash) == block:
                del self._cached[block_hash]
            self._block_hashes[block] = None
        self._ref_counts[block] = 1
        return block
