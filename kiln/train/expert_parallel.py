"""Expert parallelism, applied from outside: each MoE layer's experts are split over the "ep" ranks of the
device mesh, and tokens travel to the rank holding their expert and back by all-to-all.

The stacked expert weights (E, out, in) become DTensors sharded on dim 0 over the ep mesh, so each rank
holds E / ep experts; FSDP2 then shards them further over "dp_shard_mod_ep" (the shard ranks that hold
the same experts) while the rest of the block shards over all of "dp_shard". DCP checkpoints store the
global (E, ...) tensors, so a run resumes under any ep (or none) and exports to one process.

Gradients: a rank's expert gradient sums the contributions of every ep rank's tokens (the all-to-all's
backward brings them home); scaling it by 1 / ep makes it their mean, and FSDP then averages over
dp_shard_mod_ep, so experts get the global batch's mean gradient, as every other parameter does.

Under tensor parallelism (EP x TP, DeepSpeed-TED's tensor-expert-data layout with an expert tensor-parallel
degree of 1, as Megatron-core and torchtitan default to): attention and dense MLPs are split tp ways, and
between them sequence parallelism already leaves each tp rank its own T / tp slice of every sequence. An
MoE layer routes that slice as it is: the router, shared experts and routed experts run whole on each tp
rank, on its own tokens, and the all-to-all runs among the ranks with the same tp index. Splitting the
experts' matmuls too would need an all-gather of the slices before the layer and a reduce-scatter after
(and TED's duplicate-token dropping to keep the all-to-all from carrying each token tp times), for
expert matmuls that are already narrow (moe_intermediate_size) and short (E / ep experts sharing N*k
tokens); FSDP still shards the expert weights over dp_shard_mod_ep. The tp ranks see different tokens, so
the gradients of these weights are summed over tp (the router's and shared experts' by DTensor, as for
norm weights; the routed experts' by `_ReduceGradient`), and the aux losses sum their statistics over
the sequence's slices (`MoE.sum_over_sequence_shards`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_functional
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, PrepareModuleInput, SequenceParallel

from kiln.models.moe import Experts, MoE, combine, grouped_mlp, sort_by_expert
from kiln.models.transformer import Transformer


class ExpertParallelDispatch:
    """A drop-in for `grouped_experts` (Experts.compute) that runs the experts where they live."""

    def __init__(self, ep_mesh: DeviceMesh, num_experts: int, tp_mesh: DeviceMesh | None = None) -> None:
        self.group = ep_mesh.get_group()
        self.ep = ep_mesh.size()
        self.num_local = num_experts // self.ep
        self.num_experts = num_experts
        self.tp_group = None if tp_mesh is None else tp_mesh.get_group()  # expert gradients summed over it

    def __call__(
        self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, experts: Experts
    ) -> torch.Tensor:
        order, counts = sort_by_expert(expert_ids, self.num_experts)
        gathered = x[order // expert_ids.shape[1]]  # (N*k, hidden) by expert, so by destination rank
        send = torch.tensor(counts, dtype=torch.int64).view(self.ep, self.num_local)
        received = torch.empty_like(send)  # received[s, l]: rows rank s sends to my local expert l
        dist.all_to_all_single(received, send, group=self.group)
        send_splits, recv_splits = send.sum(1).tolist(), received.sum(1).tolist()
        arrived = _all_to_all(gathered, recv_splits, send_splits, self.group)  # by (source, local expert)
        by_expert = _transpose_chunks(arrived, received)  # by (local expert, source)
        weights_here = (experts.gate_proj, experts.up_proj, experts.down_proj)
        local = [_ReduceGradient.apply(_local(w), 1.0 / self.ep, self.tp_group) for w in weights_here]
        outputs = grouped_mlp(by_expert, received.sum(0).tolist(), *local)
        back = _transpose_chunks(outputs, received.t())  # by (source, local expert) again
        returned = _all_to_all(back, send_splits, recv_splits, self.group)  # in `gathered`'s order
        return combine(returned, order, weights)


class SequenceShardedExperts:
    """Experts.compute under tensor parallelism without EP: each tp rank runs every expert on its own
    tokens (its sequence slice), and the expert gradients are summed over the tp ranks."""

    def __init__(self, tp_mesh: DeviceMesh) -> None:
        self.tp_group = tp_mesh.get_group()

    def __call__(
        self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, experts: Experts
    ) -> torch.Tensor:
        order, counts = sort_by_expert(expert_ids, experts.gate_proj.shape[0])
        gathered = x[order // expert_ids.shape[1]]  # (N*k, hidden), grouped by expert
        weights_here = (experts.gate_proj, experts.up_proj, experts.down_proj)
        local = [_ReduceGradient.apply(_local(w), 1.0, self.tp_group) for w in weights_here]
        return combine(grouped_mlp(gathered, counts, *local), order, weights)


class _ReduceGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale` and sums it over `group` (if any)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float, group) -> torch.Tensor:
        ctx.scale, ctx.group = scale, group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad * ctx.scale
        if ctx.group is not None:
            dist.all_reduce(grad, group=ctx.group)
        return grad, None, None


class _SumOverShards(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward, because what consumes the sum is computed alike on
    every rank of the group (each rank's gradient of its own addend is the gradient of the sum)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _local(weight: torch.Tensor) -> torch.Tensor:
    return weight.to_local() if isinstance(weight, DTensor) else weight


def _transpose_chunks(rows: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """rows made of chunks sizes[a, b] laid out a-major -> the same chunks b-major."""
    chunks = rows.split(sizes.flatten().tolist())
    num_a, num_b = sizes.shape
    return torch.cat([chunks[a * num_b + b] for b in range(num_b) for a in range(num_a)])


def _all_to_all(rows: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Differentiable all-to-all of rows (n, hidden): its backward sends the gradients back the same way."""
    output = rows.new_empty(sum(output_splits), rows.shape[1])
    return dist_functional.all_to_all_single(output, rows, output_splits, input_splits, group=group)


def moe_tensor_parallel_plan(moe: MoE) -> dict[str, ParallelStyle]:
    """The `parallelize_module` plan (relative to the block) of an MoE layer under tensor + sequence
    parallelism: the layer takes its sequence slice (B, T/tp, H) as a local tensor and returns its slice;
    the router and shared-expert weights are replicated DTensors whose row-wise matmuls see Shard(0) rows,
    so DTensor sums their gradients over tp."""
    plan: dict[str, ParallelStyle] = {
        "mlp": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),), use_local_output=True
        ),
    }
    linears = ["router"]
    if moe.shared is not None:
        linears += [f"shared.{name}" for name, _ in moe.shared.named_children()]
    if moe.shared_gate is not None:
        linears.append("shared_gate")
    for name in linears:
        plan[f"mlp.{name}"] = SequenceParallel(sequence_dim=0, use_local_output=True)
    return plan


def apply_moe_sequence_parallel(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """After `moe_tensor_parallel_plan` is applied: aux losses over whole sequences, expert gradients
    summed over tp (expert parallelism, applied next, keeps the tp sum in its own dispatch)."""
    group = tp_mesh.get_group()
    for moe in model.moe_layers():
        moe.sum_over_sequence_shards = lambda tensor: _SumOverShards.apply(tensor, group)
        moe.experts.compute = SequenceShardedExperts(tp_mesh)


def apply_expert_parallel(model: Transformer, ep_mesh: DeviceMesh, tp_mesh: DeviceMesh | None = None) -> None:
    """Shard every MoE layer's stacked experts over `ep_mesh` (dim 0) and route tokens by all-to-all;
    under tensor parallelism (`tp_mesh`) also sum their gradients over the tp ranks."""
    for moe in model.moe_layers():
        experts = moe.experts
        for name in ("gate_proj", "up_proj", "down_proj"):
            full = getattr(experts, name)
            # Every rank built the same (seeded) weights; each keeps its E / ep experts.
            sharded = distribute_tensor(full.data, ep_mesh, [Shard(0)], src_data_rank=None)
            setattr(experts, name, nn.Parameter(sharded, requires_grad=full.requires_grad))
        experts.compute = ExpertParallelDispatch(ep_mesh, moe.router.out_features, tp_mesh)
