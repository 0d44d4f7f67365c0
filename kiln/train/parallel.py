"""Transformations applied to a model from outside (the model code stays single-device and plain):
activation checkpointing, tensor + sequence parallelism (DTensor `parallelize_module`), FSDP2/HSDP
(`fully_shard` per block) and DDP, in the order torchtitan applies them: pipeline split (see
kiln.train.pipeline), then TP, then checkpointing, then data parallelism."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.nn.parallel import DistributedDataParallel

from kiln.models.moe import MoE
from kiln.models.transformer import Transformer
from kiln.train.distributed import Distributed
from kiln.train.expert_parallel import (
    apply_expert_parallel,
    apply_moe_sequence_parallel,
    moe_tensor_parallel_plan,
)
from kiln.train.objective import LanguageModelObjective
from kiln.train.pipeline import Pipeline, StageLayers, tied_embedding_groups


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations during backward instead of storing them: memory per layer
    drops to the block's input, for about one extra forward pass of compute."""
    for name, block in list(model.layers.named_children()):  # keeps the container (and so the names)
        model.layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=False))


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """Megatron-style tensor parallelism with sequence parallelism (Korthikanti et al. 2022).

    q/k/v, gate and up projections are split by output features (column-wise), o_proj and down_proj by
    input features (row-wise), so each block needs one all-gather in and one reduce-scatter out per
    sublayer. Between them the residual stream and norms are split along the sequence (B, T/tp, H).
    Embedding tables and the LM head are split along the vocabulary; the loss is then vocab-parallel
    cross-entropy (see LanguageModelObjective). A tied embedding/head weight is one (V, H) table split
    the same way (rows) in both uses.
    """
    sequence_sharded_embedding = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    plan: dict[str, object] = {}  # a pipeline stage's pruned model may lack any of these (None)
    if model.embed_tokens is not None:
        plan["embed_tokens"] = sequence_sharded_embedding
    if model.norm is not None:
        plan["norm"] = SequenceParallel()
    if model.embed_positions is not None:
        plan["embed_positions"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.embed_norm is not None:
        plan["embed_norm"] = SequenceParallel()
    if model.lm_head is not None:
        plan["lm_head"] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    if plan:
        parallelize_module(model, tp_mesh, plan)
    for block in model.layers:
        block_plan: dict[str, object] = {
            "attn_norm": SequenceParallel(),
            # Attention is called as attn(x, attention_inputs, kv_cache): only x is a tensor to lay out.
            "attn": PrepareModuleInput(
                input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)
            ),
            "attn.q_proj": ColwiseParallel(),
            "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "mlp_norm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        }
        if block.attn.q_norm is not None:  # q/k-norm (Qwen3): on the rank's own heads, weights replicated
            for name in ("attn.q_norm", "attn.k_norm"):
                block_plan[name] = SequenceParallel(sequence_dim=0, use_local_output=True)
        if isinstance(block.mlp, MoE):  # routed on each rank's sequence slice (kiln.train.expert_parallel)
            block_plan = {k: v for k, v in block_plan.items() if k != "mlp" and not k.startswith("mlp.")}
            block_plan.update(moe_tensor_parallel_plan(block.mlp))
        elif block.mlp.gate_proj is not None:
            block_plan["mlp.gate_proj"] = ColwiseParallel()
        # Each rank now projects to its own num_heads / tp heads: attention counts them from its q/k/v widths.
        parallelize_module(block, tp_mesh, block_plan)
    apply_moe_sequence_parallel(model, tp_mesh)


def apply_fsdp(
    objective: LanguageModelObjective,
    dp_mesh: DeviceMesh,
    param_dtype: torch.dtype | None,
    expert_mesh: DeviceMesh | None = None,
) -> None:
    """FSDP2: each block is its own all-gather / reduce-scatter group, so only one block's parameters
    are unsharded at a time; the root group (embeddings, final norm, LM head) stays unsharded from the
    forward until its gradients are reduced. A 2-D `dp_mesh` (replicate, shard) gives HSDP.

    Under expert parallelism the (already ep-sharded) experts are their own group over `expert_mesh`
    (dp_shard_mod_ep), whose ranks hold the same experts (see kiln.train.expert_parallel)."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in objective.model.layers:
        if expert_mesh is not None and isinstance(block.mlp, MoE):
            fully_shard(block.mlp.experts, mesh=expert_mesh, mp_policy=policy)
        fully_shard(block, mesh=dp_mesh, mp_policy=policy)
    fully_shard(objective, mesh=dp_mesh, mp_policy=policy)


def parallelize_pipeline(
    pipeline: Pipeline,
    distributed: Distributed,
    *,
    activation_checkpointing: bool,
    compile_blocks: bool,
    fsdp_param_dtype: torch.dtype | None,
    microbatch_size: int,
    seq_len: int,
) -> None:
    """Apply the run's layout to this rank's pipeline stages (split by kiln.train.pipeline.split_model),
    then build their PipelineStages and schedule: TP on the pruned model, FSDP2 per block and per stage
    (each stage is its own root, so its embeddings or head stay unsharded from its forward to its
    reduce-scatter), as torchtitan does."""
    layout, mesh, model = distributed.layout, distributed.mesh, pipeline.model
    if layout.tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    pipeline.set_loss(vocab_parallel=layout.tp > 1, kernels=pipeline.modules[0].kernels)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
        for module in pipeline.modules:  # point the stages at the wrapped blocks
            module.layers = StageLayers({name: model.layers[name] for name in module.layers.keys()})
    if compile_blocks:
        for block in model.layers:
            block.compile()
    if layout.uses_fsdp:
        dp_mesh = mesh["dp_shard"] if layout.dp_replicate == 1 else mesh["dp_replicate", "dp_shard"]
        policy = MixedPrecisionPolicy(param_dtype=fsdp_param_dtype, reduce_dtype=torch.float32)
        for module in pipeline.modules:
            for block in module.layers:
                fully_shard(block, mesh=dp_mesh, mp_policy=policy)
            fully_shard(module, mesh=dp_mesh, mp_policy=policy)
    if model.config.tie_word_embeddings:  # the first and last stages' ranks sum their gradients
        pipeline.tied_group = tied_embedding_groups(mesh, distributed.pp_rank)
    # The residual stream is in FSDP's param_dtype when it casts the weights, else fp32 (autocast only).
    hidden_dtype = fsdp_param_dtype if layout.uses_fsdp and fsdp_param_dtype is not None else torch.float32
    pipeline.start(
        distributed.device,
        mesh["pp"].get_group(),
        microbatch_size=microbatch_size,
        seq_len=seq_len,
        tp=layout.tp,
        hidden_dtype=hidden_dtype,
    )


def parallelize(
    objective: LanguageModelObjective,
    distributed: Distributed,
    *,
    activation_checkpointing: bool,
    compile_blocks: bool,
    fsdp_param_dtype: torch.dtype | None,
) -> nn.Module:
    """Apply the run's layout to `objective` in place; returns the module to call for the loss (a DDP
    wrapper under plain data parallelism, else `objective` itself)."""
    layout, mesh, model = distributed.layout, distributed.mesh, objective.model
    if layout.tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
        objective.vocab_parallel = True
    if layout.ep > 1:
        apply_expert_parallel(model, mesh["ep"], mesh["tp"] if layout.tp > 1 else None)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile_blocks:  # block by block, inside FSDP's per-block hooks (as torchtitan does)
        for block in model.layers:
            block.compile()
    if layout.uses_fsdp:
        dp_mesh = mesh["dp_shard"] if layout.dp_replicate == 1 else mesh["dp_replicate", "dp_shard"]
        expert_mesh = None
        if layout.ep > 1:  # experts replicate over dp_replicate (HSDP) and shard over dp_shard_mod_ep
            replicated = layout.dp_replicate > 1
            expert_mesh = mesh["dp_replicate", "dp_shard_mod_ep"] if replicated else mesh["dp_shard_mod_ep"]
        apply_fsdp(objective, dp_mesh, fsdp_param_dtype, expert_mesh)
    elif layout.uses_ddp:
        device_ids = [distributed.device.index] if distributed.device.type == "cuda" else None
        return DistributedDataParallel(
            objective,
            device_ids=device_ids,
            process_group=mesh["dp_replicate"].get_group(),
            gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: no second copy
        )
    return objective


def clip_grad_norm(
    parameters: list[nn.Parameter],
    max_norm: float,
    *,
    counted: list[nn.Parameter] | None = None,
    pipeline_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_, also for sharded (DTensor) gradients: their norm is reduced to
    the full norm before the clip coefficient is applied, so every rank clips by the same factor.

    Under pipeline parallelism each rank holds only its stages' parameters: the squared norms of
    `counted` (default: all of `parameters`) are summed over `pipeline_group` as well."""
    counted = parameters if counted is None else counted
    groups = _by_mesh(counted).values()
    norms = [_full(torch.nn.utils.get_total_norm([p.grad for p in group], 2.0)) for group in groups]
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    if pipeline_group is not None:
        squared = total.double() ** 2
        dist.all_reduce(squared, group=pipeline_group)
        total = squared.sqrt().to(total.dtype)
    for group in _by_mesh(parameters).values():
        torch.nn.utils.clip_grads_with_norm_(group, math.inf if max_norm <= 0 else max_norm, total)
    return total


def _by_mesh(parameters: list[nn.Parameter]) -> dict[object, list[nn.Parameter]]:
    groups: dict[object, list[nn.Parameter]] = {}  # DTensors on one mesh reduce (and scale) together
    for param in parameters:
        if param.grad is not None:
            groups.setdefault(getattr(param.grad, "device_mesh", None), []).append(param)
    return groups


def _full(norm: torch.Tensor) -> torch.Tensor:
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
