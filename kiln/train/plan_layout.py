"""`kiln plan --gpus N`: recommend a tensor x pipeline x data parallel layout for a model and a cluster.

Every layout that divides the GPUs and the model is planned (kiln.train.plan) and, if it fits the GPU's
memory (with activation checkpointing when it fits only so), given an estimated step time:

  compute   6 x parameters x tokens per GPU / (peak FLOP/s x 0.4 assumed MFU), over (1 - bubble)
  TP        per layer forward + backward, 4 all-gathers / reduce-scatters of the (tokens, hidden)
            activations in bf16, each moving (tp - 1) / tp of them, over the intra-node link
  PP        per step, each micro-batch's activation forward and its gradient back, (mb, T / tp, H) bf16,
            over the intra-node link when neighbouring stages share a node, else the inter-node link
  DP        FSDP's all-gathers (forward, backward) and reduce-scatter of the rank's bf16 weights:
            3 x (dp - 1) / dp of them, over the inter-node link once the group spans nodes; FSDP
            prefetching hides it behind compute, so only what exceeds the compute time counts

tp stays within a node (tp <= GPUs per node). The layouts are ranked by that time, as the seed work did
by hand (Megatron-DeepSpeed: TP inside a node, PP across nodes, DP over the rest).
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.config import ModelConfig
from kiln.errors import KilnError
from kiln.train.layout import ParallelLayout
from kiln.train.plan import MemoryPlan, PipelineSettings, plan_memory

ASSUMED_MFU = 0.4
BF16 = 2


@dataclass(frozen=True, slots=True)
class Cluster:
    num_gpus: int
    gpus_per_node: int = 8
    gpu_memory_bytes: int = 80 * 2**30
    peak_flops: float = 989e12  # H100 SXM dense bf16
    intra_node_bytes_per_s: float = 450e9  # NVLink, per direction
    inter_node_bytes_per_s: float = 50e9  # 400 Gb/s InfiniBand per GPU


@dataclass(frozen=True, slots=True)
class LayoutChoice:
    layout: ParallelLayout
    microbatches: int
    activation_checkpointing: bool
    plan: MemoryPlan
    step_seconds: float
    parts: dict[str, float]  # compute, tp, pp, dp seconds


def recommend_layouts(
    config: ModelConfig, cluster: Cluster, *, seq_len: int, global_batch: int, top: int = 5
) -> list[LayoutChoice]:
    """The `top` fitting layouts for `global_batch` sequences of `seq_len` tokens per step, fastest first."""
    if cluster.num_gpus % cluster.gpus_per_node and cluster.num_gpus > cluster.gpus_per_node:
        raise KilnError(
            f"--gpus {cluster.num_gpus} must be a multiple of --gpus-per-node {cluster.gpus_per_node}"
        )
    choices = []
    for tp in _divisors(min(cluster.num_gpus, cluster.gpus_per_node)):
        for pp in _divisors(cluster.num_gpus // tp):
            dp = cluster.num_gpus // (tp * pp)
            if global_batch % dp or config.num_layers < pp or global_batch // dp < pp:
                continue
            layout = ParallelLayout(dp_shard=dp, tp=tp, pp=pp)
            try:
                layout.check_model(config, seq_len)
            except KilnError:
                continue
            choice = _best_fit(config, cluster, layout, seq_len, global_batch // dp)
            if choice is not None:
                choices.append(choice)
    if not choices:
        raise KilnError(
            f"no layout of {cluster.num_gpus} GPUs fits {config.num_parameters() / 1e9:.1f}B parameters in "
            f"{cluster.gpu_memory_bytes / 2**30:.0f} GiB each; add GPUs or lower seq_len / the global batch"
        )
    return sorted(choices, key=lambda choice: choice.step_seconds)[:top]


def _best_fit(
    config: ModelConfig, cluster: Cluster, layout: ParallelLayout, seq_len: int, batch_size: int
) -> LayoutChoice | None:
    microbatches = batch_size if layout.pp > 1 else 1  # one sequence per micro-batch: the smallest bubble
    settings = PipelineSettings(microbatches=microbatches)
    for recompute in (False, True):
        plan = plan_memory(
            config,
            layout,
            seq_len=seq_len,
            batch_size=batch_size,
            precision="bf16",
            activation_checkpointing=recompute,
            pipeline=settings,
        )
        if plan.peak <= cluster.gpu_memory_bytes:
            parts = _step_parts(config, cluster, layout, plan, seq_len, batch_size, recompute)
            total = parts["compute"] + parts["tp"] + parts["pp"] + max(0.0, parts["dp"] - parts["compute"])
            return LayoutChoice(layout, microbatches, recompute, plan, total, parts)
    return None


def _step_parts(
    config: ModelConfig,
    cluster: Cluster,
    layout: ParallelLayout,
    plan: MemoryPlan,
    seq_len: int,
    batch_size: int,
    recompute: bool,
) -> dict[str, float]:
    tokens = batch_size * seq_len  # per data-parallel rank
    flops = (8 if recompute else 6) * config.num_parameters() * tokens / (layout.tp * layout.pp)
    compute = flops / (cluster.peak_flops * ASSUMED_MFU) / (1 - plan.bubble_fraction)
    hidden, intra, inter = config.hidden_size, cluster.intra_node_bytes_per_s, cluster.inter_node_bytes_per_s
    tp = 0.0
    if layout.tp > 1:
        moved = 8 * tokens * hidden * BF16 * (layout.tp - 1) / layout.tp  # 4 forward + 4 backward per layer
        tp = config.num_layers / layout.pp * moved / intra
    pp = 0.0
    if layout.pp > 1:
        neighbours_share_node = layout.tp * layout.dp_size < cluster.gpus_per_node
        pp = 2 * tokens * hidden // layout.tp * BF16 / (intra if neighbours_share_node else inter)
    dp = 0.0
    if layout.dp_size > 1:
        spans_nodes = layout.tp * layout.dp_size > cluster.gpus_per_node
        weights = plan.parameters // 4 * layout.dp_shard * BF16  # the rank's unsharded bf16 weights
        moved = 3 * weights * (layout.dp_size - 1) / layout.dp_size
        dp = moved / (inter if spans_nodes else intra)
    return {"compute": compute, "tp": tp, "pp": pp, "dp": dp}


def _divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]
