"""Scheduler: token budget, sequence cap, chunked prefill beside decodes, preempting the newest."""

from kiln.engine.block_manager import BlockManager
from kiln.engine.config import EngineConfig
from kiln.engine.scheduler import Scheduler
from kiln.engine.sequence import SequenceStatus
from tests.engine.conftest import make_seq


def make_scheduler(num_blocks=16, block_size=4, **config) -> Scheduler:
    return Scheduler(EngineConfig(block_size=block_size, **config), BlockManager(num_blocks, block_size))


def run(scheduler: Scheduler) -> list[tuple[int, int]]:
    """Schedule a step and pretend it ran: computed tokens advance, finished prompts get a new token."""
    plan = scheduler.schedule()
    apply(plan)
    for item in plan.scheduled:
        item.seq.num_computed_tokens += item.num_new_tokens
        if item.seq.num_computed_tokens == item.seq.num_tokens:
            item.seq.token_ids.append(0)
    return [(item.seq.seq_id, item.num_new_tokens) for item in plan.scheduled]


def apply(plan) -> None:
    """What the engine does with a plan before the forward pass (Engine._apply_schedule)."""
    for seq in plan.preempted:
        seq.num_computed_tokens = 0
    for item in plan.scheduled:
        if item.num_cached_tokens:
            item.seq.num_computed_tokens = item.num_cached_tokens


def test_long_prompt_is_chunked_while_running_sequences_keep_decoding():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    scheduler.add(make_seq([1] * 3, seq_id=0))
    assert run(scheduler) == [(0, 3)]
    scheduler.add(make_seq([2] * 20, seq_id=1))
    assert run(scheduler) == [(0, 1), (1, 7)]
    assert run(scheduler) == [(0, 1), (1, 7)]
    assert run(scheduler) == [(0, 1), (1, 6)]
    assert run(scheduler) == [(0, 1), (1, 1)]


def test_sequence_cap_and_first_come_first_served():
    scheduler = make_scheduler(max_num_seqs=2, max_num_batched_tokens=100)
    for seq_id in range(3):
        scheduler.add(make_seq([seq_id + 1] * 4, seq_id=seq_id))
    assert run(scheduler) == [(0, 4), (1, 4)]
    assert [seq.seq_id for seq in scheduler.waiting] == [2]
    scheduler.running[0].finish("stop")
    scheduler.remove_finished()
    assert run(scheduler) == [(1, 1), (2, 4)]


def test_out_of_blocks_preempts_the_newest_and_resumes_it_first():
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=100)
    old, new = make_seq([1] * 8, seq_id=0), make_seq([2] * 7, seq_id=1)
    scheduler.add(old)
    scheduler.add(new)
    assert run(scheduler) == [(0, 8), (1, 7)]
    # `old` needs a third block for its 9th token; the only way is to take `new`'s.
    plan = scheduler.schedule()
    apply(plan)
    assert [item.seq.seq_id for item in plan.scheduled] == [0] and plan.preempted == [new]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0 and new.block_table == []
    assert scheduler.waiting[0] is new


def test_samples_wait_for_their_leader_to_compute_the_shared_prompt():
    scheduler = make_scheduler(max_num_batched_tokens=100)
    leader, follower, other = (
        make_seq([1] * 9, seq_id=0),
        make_seq([1] * 9, seq_id=1),
        make_seq([3] * 2, seq_id=2),
    )
    follower.leader = leader
    for seq in (leader, follower, other):
        scheduler.add(seq)
    assert run(scheduler) == [(0, 9), (2, 2)]
    leader.prompt_done = True
    scheduler.block_manager.cache_full_blocks(leader)
    assert run(scheduler) == [(0, 1), (2, 1), (1, 1)]  # the follower finds 8 of its 9 tokens cached
