"""Expert parallelism, applied from outside: each MoE layer's experts are split over the "ep" ranks of the
device mesh, and tokens travel to the rank holding their expert and back by all-to-all.

The stacked expert weights (E, out, in) become DTensors sharded on dim 0 over the ep mesh, so each rank
holds E / ep experts; FSDP2 then shards them further over "dp_shard_mod_ep" (the shard ranks that hold
the same experts) while the rest of the block shards over all of "dp_shard". DCP checkpoints store the
global (E, ...) tensors, so a run resumes under any ep (or none) and exports to one process.

Gradients: a rank's expert gradient sums the contributions of every ep rank's tokens (the all-to-all's
backward brings them home); scaling it by 1 / ep makes it their mean, and FSDP then averages over
dp_shard_mod_ep, so experts get the global batch's mean gradient, as every other parameter does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_functional
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from kiln.models.moe import Experts, combine, grouped_mlp, sort_by_expert
from kiln.models.transformer import Transformer


class ExpertParallelDispatch:
    """A drop-in for `grouped_experts` (Experts.compute) that runs the experts where they live."""

    def __init__(self, ep_mesh: DeviceMesh, num_experts: int) -> None:
        self.group = ep_mesh.get_group()
        self.ep = ep_mesh.size()
        self.num_local = num_experts // self.ep
        self.num_experts = num_experts

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
        local = [_ScaleGradient.apply(_local(w), 1.0 / self.ep) for w in weights_here]
        outputs = grouped_mlp(by_expert, received.sum(0).tolist(), *local)
        back = _transpose_chunks(outputs, received.t())  # by (source, local expert) again
        returned = _all_to_all(back, send_splits, recv_splits, self.group)  # in `gathered`'s order
        return combine(returned, order, weights)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


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


def apply_expert_parallel(model: Transformer, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's stacked experts over `ep_mesh` (dim 0) and route tokens by all-to-all."""
    for moe in model.moe_layers():
        experts = moe.experts
        for name in ("gate_proj", "up_proj", "down_proj"):
            full = getattr(experts, name)
            # Every rank built the same (seeded) weights; each keeps its E / ep experts.
            sharded = distribute_tensor(full.data, ep_mesh, [Shard(0)], src_data_rank=None)
            setattr(experts, name, nn.Parameter(sharded, requires_grad=full.requires_grad))
        experts.compute = ExpertParallelDispatch(ep_mesh, moe.router.out_features)
