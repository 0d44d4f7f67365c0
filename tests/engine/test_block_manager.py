"""BlockManager: allocation, reference counts, prefix hits and least-recently-freed eviction."""

import pytest

from kiln.engine.block_manager import BlockManager
from kiln.engine.sequence import Sequence
from tests.engine.conftest import make_seq


def compute(manager: BlockManager, seq: Sequence, num_tokens: int, cached: list[int] | None = None) -> None:
    num_cached_tokens = manager.allocate(seq, num_tokens, cached)
    assert num_cached_tokens is not None
    seq.num_computed_tokens += num_cached_tokens + num_tokens  # what the engine does
    manager.cache_full_blocks(seq)


def test_allocation_grows_block_tables_and_refuses_without_changing_anything():
    manager = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq(list(range(10)))
    compute(manager, seq, 10)
    assert len(seq.block_table) == 3 and manager.num_free_blocks == 1
    other = make_seq(list(range(100, 109)), seq_id=1)
    assert manager.allocate(other, 9) is None
    assert other.block_table == [] and manager.num_free_blocks == 1
    manager.free(seq)
    assert manager.num_free_blocks == 4 and manager.usage == 0


def test_a_shared_prefix_maps_to_the_same_blocks_with_reference_counts():
    manager = BlockManager(num_blocks=8, block_size=4)
    first = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute(manager, first, 9)
    second = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 42, 43], seq_id=1)
    hit = manager.cached_prefix(second)
    assert hit == first.block_table[:2]
    compute(manager, second, 2, hit)
    assert second.num_computed_tokens == 10 and second.block_table[:2] == hit
    manager.free(first)
    assert manager.num_free_blocks == 8 - 3  # the shared blocks are still held by `second`
    # A different first block breaks the chain even when later blocks repeat.
    assert manager.cached_prefix(make_seq([0, 2, 3, 4, 5, 6, 7, 8, 9], seq_id=2)) == []


def test_freed_blocks_stay_cached_until_reused_least_recently_freed_first():
    manager = BlockManager(num_blocks=4, block_size=2)
    old, new = make_seq([1, 2, 3]), make_seq([7, 8, 9], seq_id=1)
    compute(manager, old, 3)
    compute(manager, new, 3)
    old_full, new_full = old.block_table[0], new.block_table[0]  # holding [1, 2] and [7, 8]
    manager.free(old)
    manager.free(new)
    assert manager.num_free_blocks == 4
    assert manager.cached_prefix(make_seq([1, 2, 5], seq_id=2)) == [old_full]
    # Three new blocks: the two unhashed partial blocks go first, then `old`'s block, freed before `new`'s.
    assert manager.allocate(make_seq([50, 51, 52, 53, 54, 55], seq_id=3), 6) == 0
    assert manager.cached_prefix(make_seq([1, 2, 5], seq_id=4)) == []
    assert manager.cached_prefix(make_seq([7, 8, 5], seq_id=5)) == [new_full]


@pytest.mark.parametrize("enabled", [True, False])
def test_prefix_caching_can_be_switched_off(enabled):
    manager = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=enabled)
    compute(manager, make_seq([1, 2, 3, 4, 5]), 5)
    assert bool(manager.cached_prefix(make_seq([1, 2, 3, 4, 9], seq_id=1))) is enabled


def test_interleaved_sequences_each_grow_in_consecutive_blocks():
    """Decode hands out blocks one at a time across sequences; each sequence's still come out consecutive,
    since a new sequence starts at a blank run long enough for all of it (next-fit)."""
    manager = BlockManager(num_blocks=40, block_size=4)
    seqs = [make_seq(list(range(10 * i, 10 * i + 8)), seq_id=i) for i in range(3)]
    for seq in seqs:
        seq.max_total_tokens = 48  # 12 blocks
        compute(manager, seq, 8)
    for _ in range(40):  # one token a step, round robin
        for seq in seqs:
            seq.token_ids.append(0)
            compute(manager, seq, 1)
    for seq in seqs:
        assert len(seq.block_table) == 12
        assert seq.block_table == list(range(seq.block_table[0], seq.block_table[0] + 12))
    assert len({seq.block_table[0] for seq in seqs}) == 3


def test_blocks_placed_in_runs_leave_the_prefix_cache_as_front_first_allocation_would():
    """Against the plain policy (always the front of the free list), random allocations, prefix hits and
    frees keep the same cached prefixes and free counts: placement only picks among blank blocks."""
    import random

    class FrontFirst(BlockManager):
        def _next_block(self, seq):
            return self._take_free_block()

    rng = random.Random(0)
    placed, plain = BlockManager(num_blocks=24, block_size=2), FrontFirst(num_blocks=24, block_size=2)
    live: dict[int, tuple[Sequence, Sequence]] = {}
    for step in range(400):
        if live and (rng.random() < 0.35 or len(live) > 5):
            a, b = live.pop(rng.choice(list(live)))
            placed.free(a)
            plain.free(b)
        elif live and rng.random() < 0.5:  # grow a live sequence by a few tokens
            a, b = live[rng.choice(list(live))]
            new = [rng.randrange(4) for _ in range(rng.randrange(1, 4))]
            got = [m.allocate(s, len(new)) for m, s in ((placed, a), (plain, b))]
            assert (got[0] is None) == (got[1] is None)
            if got[0] is not None:
                for m, s in ((placed, a), (plain, b)):
                    s.token_ids.extend(new)
                    s.num_computed_tokens += len(new)
                    m.cache_full_blocks(s)
        else:  # a new sequence from a small token alphabet, so prefixes repeat
            tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 9))]
            a, b = make_seq(tokens, seq_id=step), make_seq(tokens, seq_id=step)
            a.max_total_tokens = b.max_total_tokens = len(tokens) + rng.randrange(1, 12)
            hits = [placed.cached_prefix(a), plain.cached_prefix(b)]
            assert len(hits[0]) == len(hits[1])
            new = len(tokens) - len(hits[0]) * 2
            got = [placed.allocate(a, new, hits[0]), plain.allocate(b, new, hits[1])]
            assert got[0] == got[1]
            if got[0] is not None:
                for m, s, n in ((placed, a, got[0]), (plain, b, got[1])):
                    s.num_computed_tokens += n + new
                    m.cache_full_blocks(s)
                live[step] = (a, b)
        assert placed.num_free_blocks == plain.num_free_blocks
        assert set(placed._cached) == set(plain._cached)
        blank = [block for block in placed._free if placed._block_hashes[block] is None]
        assert list(placed._free)[: len(blank)] == blank  # blank blocks precede the cached ones
        assert [i for i, flag in enumerate(placed._blank) if flag] == sorted(blank)
        assert placed._num_blank == len(blank)
