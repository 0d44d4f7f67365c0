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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.config import ModelConfig
from kiln.models.transformer import Transformer
from kiln.train.layout import ParallelLayout

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
) -> MemoryPlan:
    """Estimate per-rank training memory for `batch_size` sequences of `seq_len` tokens per data-parallel
    rank (TrainConfig.batch_size) under `layout`."""
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
