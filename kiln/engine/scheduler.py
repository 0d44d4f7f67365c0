"""Scheduler: decides, each step, which tokens of which sequences the next forward pass computes.

One step spends a token budget (max_num_batched_tokens) on at most max_num_seqs sequences. Running
sequences go first, oldest first: a decode costs one token, an unfinished prompt takes what budget is
left as a chunk, so a long prompt never stalls the streams already running. Waiting sequences are then
admitted in arrival order, reusing cached prefix blocks. When the KV cache runs out of blocks, the newest
running sequence is preempted: its blocks are freed and it waits to recompute, so no request ever fails
for lack of memory.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kiln.engine.block_manager import BlockManager
from kiln.engine.config import EngineConfig
from kiln.engine.sequence import Sequence, SequenceStatus


@dataclass(kw_only=True, slots=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # tokens this step computes, after those already computed or cached
    # Prefix-cache hits found when the sequence was admitted this step; the engine counts them as
    # computed before the forward pass.
    num_cached_tokens: int = 0


@dataclass(kw_only=True, slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)  # blocks freed; the engine resets their progress

    @property
    def num_batched_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.scheduled)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            assert num_new_tokens > 0, "a running sequence always has a token to compute"
            if not self._make_room(seq, num_new_tokens, output.preempted):
                break  # `seq` itself was preempted, and every sequence after it before that
            output.scheduled.append(ScheduledSequence(seq=seq, num_new_tokens=num_new_tokens))
            budget -= num_new_tokens
            index += 1
        if not output.preempted:  # memory is short: admitting more would only preempt again
            self._admit(budget, output)
        return output

    def _make_room(self, seq: Sequence, num_new_tokens: int, preempted: list[Sequence]) -> bool:
        """Allocate `seq`'s blocks, preempting the newest sequences until they fit; False if `seq` was."""
        while self.block_manager.allocate(seq, num_new_tokens) is None:
            victim = self.running.pop()
            self.block_manager.free(victim)
            victim.status = SequenceStatus.WAITING
            self.waiting.appendleft(victim)  # resumes before anything that arrived later
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _admit(self, budget: int, output: SchedulerOutput) -> None:
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.is_blocked_on_leader:
                skipped.append(self.waiting.popleft())
                continue
            # Prompt logprobs need the logits of every prompt token, so such a prompt computes them all.
            cached = [] if seq.wants_prompt_logprobs else self.block_manager.cached_prefix(seq)
            num_cached_tokens = len(cached) * self.block_manager.block_size
            num_new_tokens = min(seq.num_tokens - num_cached_tokens, budget)
            if self.block_manager.allocate(seq, num_new_tokens, cached) is None:
                break  # first come, first served: nothing overtakes the head of the queue
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            output.scheduled.append(
                ScheduledSequence(seq=seq, num_new_tokens=num_new_tokens, num_cached_tokens=num_cached_tokens)
            )
            budget -= num_new_tokens
        self.waiting.extendleft(reversed(skipped))

    def remove_finished(self) -> list[Sequence]:
        """Drop finished sequences (finished by the engine or aborted) and free their blocks."""
        finished = [seq for seq in self.running if seq.is_finished]
        finished += [seq for seq in self.waiting if seq.is_finished]
        if finished:
            self.running = [seq for seq in self.running if not seq.is_finished]
            self.waiting = deque(seq for seq in self.waiting if not seq.is_finished)
            for seq in finished:
                self.block_manager.free(seq)
        return finished
