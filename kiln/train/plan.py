"""`kiln plan`: training memory per rank for a model, batch and parallel layout, before launching a run.

The estimate counts what kiln's trainer keeps (docs/scaling.md states the formulas):
  parameters  4 B x the rank's share of every weight (fp32 master weights)
  gradients   as parameters (fp32, sharded like them; DDP allocates all of them up front as buckets)
  optimizer   8 B x the rank's share (AdamW's two fp32 moments)
  activations the tensors autograd saves for backward, per layer, for the rank's micro-batch
  buffers     what is alive only around the peak: FSDP's unsharded root (embeddings, LM head) and
              blocks, and the loss's working set (fused kernel: an fp32 (V, H) gradient and a temporary
              of that size, and a (256, V) chunk of logits; vocab-parallel: three (N, V/tp) fp32 arrays)
Under expert parallelism (--ep) a rank holds num_experts / ep of each MoE layer's experts, which FSDP
splits over the dp_shard / ep ranks holding the same ones; FSDP's unsharded block then holds those only.
Under tensor parallelism an MoE layer runs whole on each tp rank's sequence slice (expert_parallel.py):
its router, shared and routed experts are not split tp ways, and its activations cover T / tp tokens.
The peak is their sum, except that gradients are not yet allocated when activations peak (the start of
backward) unless DDP holds them: peak = parameters + optimizer + activations + buffers (+ gradients, DDP).
Under pipeline parallelism (--pp) each pipeline rank is planned on its own (plan_pipeline_memory):
its stages' share of the weights, and the activations of the micro-batches its schedule keeps in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from kiln.config import ModelConfig
from kiln.models.transformer import Transformer
from kiln.train.layout import ParallelLayout
from kiln.train.pipeline import split_model, stage_layer_counts

LOSS_CHUNK_TOKENS = 256  # kiln.kernels.linear_cross_entropy's default chunk
FP32 = 4

# Parameters that tensor parallelism keeps whole on every rank: norms, and biases added after the
# row-parallel reduction. Everything else (matmul weights, embeddings, the LM head) is split tp ways.
_TP_REPLICATED_SUFFIXES = ("norm.weight", "norm.bias", "o_proj.bias", "down_proj.bias")
# An MoE layer's router and shared experts (the routed experts are split by ep, not tp).
_TP_REPLICATED_MOE = (".mlp.router.", ".mlp.shared.", ".mlp.shared_gate.")


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """Estimated bytes per rank. `peak` is what the rank needs at its busiest point."""

    layout: ParallelLayout
    tokens_per_rank: int  # tokens in one micro-batch on one rank
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    buffers: int
    gradients_at_peak: bool  # DDP: gradient buckets exist for the whole run
    stage_peaks: tuple[int, ...] = ()  # under --pp: each pipeline rank's peak (this plan is the largest)
    bubble_fraction: float = 0.0  # under --pp: the schedule's idle share of a step

    @property
    def peak(self) -> int:
        peak = self.parameters + self.optimizer + self.activations + self.buffers
        return peak + (self.gradients if self.gradients_at_peak else 0)

    def rows(self) -> dict[str, int]:
        return {
            "parameters": self.parameters,
            "gradients": self.gradients,
            "optimizer state": self.optimizer,
            "activations": self.activations,
            "buffers (peak-time)": self.buffers,
        }


def _numel_per_rank(model: Transformer, layout: ParallelLayout) -> tuple[int, int, int, int]:
    """(all parameters, root parameters (embeddings, final norm, head), the largest block's, MoE experts')
    on one rank before FSDP's split: split tp ways where tensor parallelism splits them, and the routed
    experts ep ways (each expert-parallel rank holds num_experts / ep of them)."""

    def local(name: str, param: torch.Tensor) -> int:
        if ".experts." in name:
            return param.numel() // layout.ep
        replicated = name.endswith(_TP_REPLICATED_SUFFIXES) or any(
            part in name for part in _TP_REPLICATED_MOE
        )
        return param.numel() // (1 if replicated else layout.tp)

    total = sum(local(n, p) for n, p in model.named_parameters())
    blocks = [sum(local(f"layers.{n}", p) for n, p in block.named_parameters()) for block in model.layers]
    experts = sum(local(n, p) for n, p in model.named_parameters() if ".experts." in n)
    return total, total - sum(blocks), max(blocks), experts


def activation_bytes(
    config: ModelConfig, tokens: int, tp: int, element_bytes: int, activation_checkpointing: bool
) -> int:
    """Bytes autograd saves for backward over `tokens` tokens of one rank's micro-batch.

    Per layer, in elements per token: each RMSNorm keeps its input and output (2H, of the rank's
    sequence shard under TP: 2H/tp); attention keeps rotated q and k, v and its output (2q + 2kv, split
    by heads); the gated MLP keeps gate, act(gate), up and their product (4I; 2I for a plain MLP), split
    by columns. Under TP the all-gathered inputs of attention and MLP (H each) are kept whole; an MoE layer
    keeps its activations for the rank's T / tp tokens only (it routes the sequence slice). q/k-norm keeps
    q and k once more (the norms' inputs). The final norm adds 2H. Activation checkpointing keeps only
    each block's input, plus one block's worth while it is recomputed.
    """
    hidden, intermediate = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    mlp = (4 if config.mlp == "gated" else 2) * intermediate
    # An MoE layer keeps, per token: router logits and probabilities (2E), for each of its k experts the
    # gathered input, the gated MLP's four (4 I_moe) and the output (2H), and the shared experts' four.
    moe = 2 * config.num_experts + config.num_experts_per_token * (
        4 * config.moe_intermediate_size + 2 * hidden
    )
    moe += 4 * config.shared_expert_intermediate_size
    common = 4 * hidden / tp + (hidden if tp > 1 else 0) + (2 * q + 2 * kv + (q + kv) * config.qk_norm) / tp
    dense = mlp / tp + (hidden if tp > 1 else 0)  # the MLP's all-gathered input under TP
    moe /= tp  # routed on the rank's sequence slice
    num_moe = config.num_moe_layers
    per_layer = common + max(dense, moe if num_moe else 0)  # the largest layer (recomputed alone)
    if activation_checkpointing:
        saved = config.num_layers * hidden / tp + per_layer
    else:
        saved = config.num_layers * common + (config.num_layers - num_moe) * dense + num_moe * moe
    return int((saved + 2 * hidden / tp) * tokens * element_bytes)


def plan_memory(
    config: ModelConfig,
    layout: ParallelLayout,
    *,
    seq_len: int,
    batch_size: int,
    precision: str = "fp32",
    activation_checkpointing: bool = False,
    pipeline: PipelineSettings | None = None,
) -> MemoryPlan:
    """Estimate per-rank training memory for `batch_size` sequences of `seq_len` tokens per data-parallel
    rank (TrainConfig.batch_size) under `layout` (under --pp: the busiest pipeline rank's, see
    plan_pipeline_memory; `pipeline` gives the schedule, default 1F1B with pp micro-batches)."""
    if layout.pp > 1:
        return plan_pipeline_memory(
            config,
            layout,
            pipeline or PipelineSettings(),
            seq_len=seq_len,
            batch_size=batch_size,
            precision=precision,
            activation_checkpointing=activation_checkpointing,
        )
    with torch.device("meta"):
        model = Transformer(config)
    total, root, block, experts = _numel_per_rank(model, layout)
    shard = layout.dp_shard if layout.uses_fsdp else 1
    element_bytes = 2 if precision in ("bf16", "fp16") else FP32
    tokens = batch_size * seq_len
    # FSDP splits the experts a rank holds over the dp_shard / ep ranks that hold the same ones
    parameters = FP32 * ((total - experts) // shard + experts // max(shard // layout.ep, 1))
    activations = activation_bytes(config, tokens, layout.tp, element_bytes, activation_checkpointing)
    buffers = _loss_buffers(config, tokens, layout.tp, element_bytes)
    if layout.uses_fsdp:  # the root stays unsharded through forward and backward; blocks come two at a time
        param_bytes = element_bytes if precision == "bf16" else FP32
        buffers += param_bytes * (root + 2 * block)
    return MemoryPlan(
        layout=layout,
        tokens_per_rank=tokens,
        parameters=parameters,
        gradients=parameters,
        optimizer=2 * parameters,
        activations=activations,
        buffers=buffers,
        gradients_at_peak=layout.uses_ddp,
    )


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    """The pipeline options of a TrainConfig (pp_schedule, pp_microbatches, ...) that `kiln plan` needs."""

    schedule: str = "1f1b"
    microbatches: int = 0  # 0 = pp
    virtual_stages: int = 1
    stage_layers: str = ""

    @classmethod
    def of(cls, config) -> PipelineSettings:
        """A TrainConfig's pipeline options."""
        return cls(
            schedule=config.pp_schedule,
            microbatches=config.pp_microbatches,
            virtual_stages=config.pp_virtual_stages,
            stage_layers=config.pp_stage_layers,
        )


def _loss_buffers(config: ModelConfig, tokens: int, tp: int, element_bytes: int) -> int:
    vocab, hidden = config.vocab_size, config.hidden_size
    if tp > 1:  # vocab-parallel cross-entropy: logits, log-probabilities and their gradient, V/tp wide
        return 3 * tokens * (vocab // tp) * FP32 + tokens * hidden * element_bytes
    chunk = min(LOSS_CHUNK_TOKENS, tokens)
    return 2 * vocab * hidden * FP32 + tokens * hidden * element_bytes + chunk * vocab * FP32


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------- pipeline parallelism
# `kiln plan` under pipeline parallelism: each pipeline rank's memory and the schedule's bubble.
#
# A pipeline rank holds its stages' weights (split by kiln.train.pipeline exactly as a run splits them:
# embeddings on the first stage, final norm and head on the last, the tied head's copy included) and the
# activations of every micro-batch its schedule has run forward but not yet backward. At the start of the
# first backward that is (rank r of p, m micro-batches, v stages per rank):
#   GPipe            m micro-batches (all forwards run first)
#   1F1B             min(m, p - r)
#   interleaved 1F1B min(m v, (v - 1) m_round + 2 (p - 1 - r) + 1) stage chunks of 1/v of the rank's
#                    layers each, m_round = m / max(1, m // p) (torch's ScheduleInterleaved1F1B warm-up)
# The bubble, the share of a step a rank idles while the pipeline fills and drains, is (p - 1) / (m + p - 1)
# for GPipe and 1F1B, and (p - 1) / (v m + p - 1) interleaved (each chunk is 1/v as long).


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
