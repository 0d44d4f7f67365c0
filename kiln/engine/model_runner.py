"""ModelRunner: one forward pass over a step's flattened batch of decode tokens and prefill chunks.

Every scheduled token becomes one row of a single (1, N) batch with its own position; nothing is
padded. The attention backend reads and writes the paged KV pool. Only the rows that need them go
through the LM head: each sequence's last row when it samples, and prompt rows whose logprobs were asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kiln.engine.attention import KVPool, PagedBatch, TorchPagedAttention
from kiln.engine.sampler import TopLogprobs, top_logprobs
from kiln.engine.scheduler import ScheduledSequence
from kiln.engine.sequence import Sequence
from kiln.finetune.serving import ServedAdapters
from kiln.models.transformer import Transformer


@dataclass(kw_only=True, slots=True)
class RunnerOutput:
    sampling_seqs: list[Sequence]  # sequences whose last computed token yields their next token
    logits: torch.Tensor  # (len(sampling_seqs), V)
    # Logprobs of prompt tokens computed this step, per sequence that asked, in prompt order.
    prompt_logprobs: list[tuple[Sequence, list[TopLogprobs]]] = field(default_factory=list)


@dataclass(kw_only=True, slots=True)
class _Batch:
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    query_starts: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    adapter_rows: list[int] = field(default_factory=list)  # each row's adapter index (0 = the base)
    sampling_seqs: list[Sequence] = field(default_factory=list)
    prompt_rows: list[tuple[Sequence, list[int]]] = field(default_factory=list)


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        num_blocks: int,
        block_size: int,
        attention=TorchPagedAttention,
        adapters: ServedAdapters | None = None,
        kv_cache_dtype: str | None = None,
    ) -> None:
        """`attention` builds the step's paged attention backend from (pool, PagedBatch, ModelConfig);
        `adapters` apply each row's LoRA (see kiln.finetune.serving); `kv_cache_dtype` int8/int4 quantizes
        the pool (None: the model dtype)."""
        self.adapters = adapters
        self.model = model
        weight = model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.block_size = block_size
        self.pool = KVPool(model.config, num_blocks, block_size, self.dtype, self.device, kv_cache_dtype)
        self.attention = attention

    @torch.no_grad()
    def execute(self, scheduled: list[ScheduledSequence]) -> RunnerOutput:
        batch = self._flatten(scheduled)
        device = self.device
        paged = PagedBatch(
            slot_mapping=torch.tensor(batch.slots, device=device),
            query_starts=batch.query_starts,
            query_lens=batch.query_lens,
            context_lens=batch.context_lens,
            block_tables=batch.block_tables,
        )
        input_ids = torch.tensor(batch.input_ids, device=device)[None]  # (1, N)
        positions = torch.tensor(batch.positions, device=device)[None]
        backend = self.attention(self.pool, paged, self.model.config)
        if self.adapters is not None:
            self.adapters.rows.set(batch.adapter_rows, device)
        try:
            hidden = self.model.hidden_states(input_ids, positions, attention=backend)[0]  # (N, hidden)
        finally:
            if self.adapters is not None:
                self.adapters.rows.clear()
        output = RunnerOutput(
            sampling_seqs=batch.sampling_seqs, logits=self.model.logits(hidden[batch.sample_rows])
        )
        for seq, rows in batch.prompt_rows:
            output.prompt_logprobs.append((seq, self._prompt_logprobs(seq, hidden, rows, batch.positions)))
        return output

    def _flatten(self, scheduled: list[ScheduledSequence]) -> _Batch:
        # Decodes first, longest context first, so that the attention backend finds runs of similar ones.
        def order(item: ScheduledSequence) -> tuple[bool, int]:
            return item.num_new_tokens != 1, -(item.seq.num_computed_tokens + item.num_new_tokens)

        batch = _Batch()
        size = self.block_size
        for item in sorted(scheduled, key=order):
            seq, start, count = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
            end = start + count
            first_row = len(batch.input_ids)
            table = seq.block_table
            batch.input_ids.extend(seq.token_ids[start:end])
            if self.adapters is not None:
                batch.adapter_rows.extend([self.adapters.adapter_index(seq.params.adapter)] * count)
            batch.positions.extend(range(start, end))
            batch.slots.extend(table[p // size] * size + p % size for p in range(start, end))
            batch.query_starts.append(first_row)
            batch.query_lens.append(count)
            batch.context_lens.append(end)
            batch.block_tables.append(table)
            if end == seq.num_tokens:
                batch.sample_rows.append(first_row + count - 1)
                batch.sampling_seqs.append(seq)
            if seq.wants_prompt_logprobs:
                # Row p predicts prompt token p + 1; skip the ones recorded before a preemption.
                num_recorded = len(seq.request.prompt_logprobs)
                rows = [
                    first_row + p - start
                    for p in range(start, end)
                    if num_recorded <= p + 1 < seq.num_prompt_tokens
                ]
                if rows:
                    batch.prompt_rows.append((seq, rows))
        return batch

    def _prompt_logprobs(
        self, seq: Sequence, hidden: torch.Tensor, rows: list[int], positions: list[int]
    ) -> list[TopLogprobs]:
        logprobs = self.model.logits(hidden[rows]).float().log_softmax(-1)  # (R, V)
        targets = torch.tensor([seq.token_ids[positions[row] + 1] for row in rows], device=self.device)
        return top_logprobs(logprobs, targets, [seq.params.prompt_logprobs] * len(rows))
