"""`kiln plan` under pipeline parallelism: each pipeline rank's memory and the schedule's bubble.

A pipeline rank holds its stages' weights (split by kiln.train.pipeline exactly as a run splits them:
embeddings on the first stage, final norm and head on the last, the tied head's copy included) and the
activations of every micro-batch its schedule has run forward but not yet backward. At the start of the
first backward that is (rank r of p, m micro-batches, v stages per rank):
  GPipe            m micro-batches (all forwards run first)
  1F1B             min(m, p - r)
  interleaved 1F1B min(m v, (v - 1) m_round + 2 (p - 1 - r) + 1) stage chunks of 1/v of the rank's
                   layers each, m_round = m / max(1, m // p) (torch's ScheduleInterleaved1F1B warm-up)
The bubble, the share of a step a rank idles while the pipeline fills and drains, is (p - 1) / (m + p - 1)
for GPipe and 1F1B, and (p - 1) / (v m + p - 1) interleaved (each chunk is 1/v as long).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from kiln.config import ModelConfig
from kiln.models.transformer import Transformer
from kiln.train.layout import ParallelLayout
from kiln.train.pipeline import split_model, stage_layer_counts
from kiln.train.plan import (
    FP32,
    MemoryPlan,
    PipelineSettings,
    _loss_buffers,
    _numel_per_rank,
    activation_bytes,
)


def bubble_fraction(schedule: str, pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """The idle share of a step on each rank: (p - 1) / (m v + p - 1), v = 1 unless interleaved."""
    chunks = microbatches * (virtual_stages if schedule == "interleaved-1f1b" else 1)
    return (pp - 1) / (chunks + pp - 1)


def in_flight_chunks(schedule: str, pp: int, rank: int, microbatches: int, virtual_stages: int = 1) -> int:
    """Stage chunks (one micro-batch through one of the rank's stages) whose activations rank `rank`
    holds at its peak."""
    if schedule == "gpipe":
        return microbatches
    if schedule == "1f1b":
        return min(microbatches, pp - rank)
    per_round = microbatches // max(1, microbatches // pp)
    warmup = (virtual_stages - 1) * per_round + 2 * (pp - 1 - rank)
    return min(microbatches * virtual_stages, warmup + 1)


def plan_pipeline_memory(
    config: ModelConfig,
    layout: ParallelLayout,
    settings: PipelineSettings,
    *,
    seq_len: int,
    batch_size: int,
    precision: str,
    activation_checkpointing: bool,
) -> MemoryPlan:
    """The plan of the pipeline rank with the largest peak (`stage_peaks` lists every rank's)."""
    recompute = activation_checkpointing
    microbatches = settings.microbatches or layout.pp
    plans = [
        _rank_plan(config, layout, settings, rank, microbatches, seq_len, batch_size, precision, recompute)
        for rank in range(layout.pp)
    ]
    busiest = max(plans, key=lambda plan: plan.peak)
    bubble = bubble_fraction(settings.schedule, layout.pp, microbatches, settings.virtual_stages)
    return MemoryPlan(
        layout=busiest.layout,
        tokens_per_rank=busiest.tokens_per_rank,
        parameters=busiest.parameters,
        gradients=busiest.gradients,
        optimizer=busiest.optimizer,
        activations=busiest.activations,
        buffers=busiest.buffers,
        gradients_at_peak=True,
        stage_peaks=tuple(plan.peak for plan in plans),
        bubble_fraction=bubble,
    )


def _rank_plan(
    config: ModelConfig,
    layout: ParallelLayout,
    settings: PipelineSettings,
    rank: int,
    microbatches: int,
    seq_len: int,
    batch_size: int,
    precision: str,
    activation_checkpointing: bool,
) -> MemoryPlan:
    split = SimpleNamespace(
        pp=layout.pp,
        pp_virtual_stages=settings.virtual_stages,
        pp_stage_layers=settings.stage_layers,
        pp_schedule=settings.schedule,
        pp_microbatches=microbatches,
    )
    with torch.device("meta"):
        pipeline = split_model(Transformer(config), split, rank)
    total = _numel_per_rank(pipeline.model, layout)[0]
    shard = layout.dp_shard if layout.uses_fsdp else 1
    element_bytes = 2 if precision in ("bf16", "fp16") else FP32
    tokens = batch_size // microbatches * seq_len  # one micro-batch
    counts = stage_layer_counts(config, pipeline.num_stages, settings.stage_layers)
    chunk_layers = max(counts[index] for index in pipeline.stage_indices)
    chunk = config.replace(num_layers=chunk_layers)
    per_chunk = activation_bytes(chunk, tokens, layout.tp, element_bytes, activation_checkpointing)
    chunks = in_flight_chunks(settings.schedule, layout.pp, rank, microbatches, settings.virtual_stages)
    # the received input and the gradient sent back of the micro-batch in flight: (mb, T/tp, H) each
    buffers = 2 * tokens * config.hidden_size // layout.tp * element_bytes
    if pipeline.holds_last_stage:
        buffers += _loss_buffers(config, tokens, layout.tp, element_bytes)
    parameters = FP32 * total // shard
    gradients = parameters
    if layout.uses_fsdp:
        # The pipeline defers FSDP's reduce-scatter and resharding to the last micro-batch's backward: from
        # the first backward on, the stage's weights stay unsharded and its gradients accumulate unsharded.
        buffers += (element_bytes if precision == "bf16" else FP32) * total
        gradients = FP32 * total
    return MemoryPlan(
        layout=layout,
        tokens_per_rank=tokens,
        parameters=parameters,
        gradients=gradients,
        optimizer=2 * parameters,
        activations=chunks * per_chunk,
        buffers=buffers,
        gradients_at_peak=True,  # the first micro-batches' gradients exist while later ones' activations do
    )
