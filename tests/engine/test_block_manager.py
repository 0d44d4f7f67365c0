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
