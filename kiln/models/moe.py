"""Mixture of experts: a top-k softmax router over gated (SwiGLU) experts, optional shared experts.

`MoE` replaces a block's dense MLP where `ModelConfig.is_moe_layer` says so (Mixtral, Qwen2-MoE). Routed
experts live as stacked weights (E, out, in), so an expert-parallel run can shard them along dim 0.

Expert compute groups tokens by expert: the (token, slot) assignments are sorted by expert so each expert
reads one contiguous slice of a single gathered tensor (`grouped_experts`); there is no Python loop over
tokens. `reference_experts` beside it runs every expert on every token and masks, the tests' oracle.

In training the layer records its auxiliary losses (`aux_loss`): the Switch/Mixtral load-balancing loss
and the ST-MoE router z-loss, weighted by the config's coefficients; the trainer adds them to the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import ModelConfig
from kiln.kernels.runtime import KernelChoice, check_kernels
from kiln.models.layers import MLP


class Experts(nn.Module):
    """`num_experts` gated MLPs as stacked weights: gate/up (E, inner, hidden), down (E, hidden, inner)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        e, h, inner = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(e, inner, h))
        self.up_proj = nn.Parameter(torch.empty(e, inner, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, inner))
        self.std = config.initializer_range
        self.num_layers = config.num_layers
        # How tokens reach the experts: `grouped_experts` here; expert parallelism
        # (kiln/train/expert_parallel.py) swaps in its all-to-all dispatch.
        self.compute: Callable[..., torch.Tensor] = grouped_experts

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, hidden), expert_ids and weights (N, k) -> sum_k weights * expert(x), (N, hidden).
        A module call (not a function on the weights), so FSDP gathers the weights around it."""
        return self.compute(x, expert_ids, weights, self)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate_proj, std=self.std)
        nn.init.normal_(self.up_proj, std=self.std)
        # residual output projection, scaled as Transformer.reset_parameters scales down_proj
        nn.init.normal_(self.down_proj, std=self.std / math.sqrt(2 * self.num_layers))


def route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """router_logits (N, E) -> fp32 probabilities (N, E), top-k weights (N, k) fp32, expert ids (N, k).

    Softmax in fp32 before the top-k, as Mixtral and Qwen2-MoE do, so routing does not depend on dtype.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, experts


def expert_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert's SwiGLU on rows x (n, hidden): gate/up (inner, hidden), down (hidden, inner)."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def grouped_mlp(
    rows: torch.Tensor, counts: list[int], gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """rows (n, hidden) grouped by expert, counts[e] rows for expert e of the stacked gate/up/down
    (E, ...) -> (n, hidden). Each expert multiplies its contiguous slice; an expert with no rows still
    runs (on an empty slice), so its weights take part in the graph with zero gradients (DDP, FSDP)."""
    slices = rows.split(counts)
    return torch.cat([expert_mlp(part, gate[e], up[e], down[e]) for e, part in enumerate(slices)])


def grouped_experts(
    x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, experts: Experts
) -> torch.Tensor:
    """x (N, hidden), expert_ids and weights (N, k) -> sum_k weights * expert(x), (N, hidden).

    Assignments are sorted by expert (stable, so ties keep token order), the tokens gathered once into
    that order, and each expert multiplies its contiguous slice (`grouped_mlp`).
    """
    order, counts = sort_by_expert(expert_ids, experts.gate_proj.shape[0])
    gathered = x[order // expert_ids.shape[1]]  # (N*k, hidden), grouped by expert
    grouped = grouped_mlp(gathered, counts, experts.gate_proj, experts.up_proj, experts.down_proj)
    return combine(grouped, order, weights)


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """The (token, slot) assignments (N*k,) in expert order, and how many each expert got."""
    flat = expert_ids.reshape(-1)
    return torch.argsort(flat, stable=True), torch.bincount(flat, minlength=num_experts).tolist()


def combine(grouped: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Expert outputs (N*k, hidden) in `order` -> the weighted sum over each token's k slots (N, hidden).
    The sum runs in slot order, so a token's result does not depend on the rest of the batch's routing."""
    num_tokens, top_k = weights.shape
    unsorted = grouped[torch.argsort(order)].view(num_tokens, top_k, -1)  # back to (token, slot)
    return (unsorted * weights.to(grouped.dtype).unsqueeze(-1)).sum(dim=1)


def reference_experts(
    x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, experts: Experts
) -> torch.Tensor:
    """The dense-loop reference of `grouped_experts`: every expert on every token, masked by its weight."""
    out = torch.zeros_like(x)
    for e in range(experts.gate_proj.shape[0]):
        weight_of_e = (weights * (expert_ids == e)).sum(dim=-1, keepdim=True).to(x.dtype)  # (N, 1)
        mlp = expert_mlp(x, experts.gate_proj[e], experts.up_proj[e], experts.down_proj[e])
        out = out + weight_of_e * mlp
    return out


SumOverShards = Callable[[torch.Tensor], torch.Tensor]


def load_balancing_loss(
    probs: torch.Tensor,
    expert_ids: torch.Tensor,
    num_sequences: int = 1,
    sum_over_shards: SumOverShards | None = None,
) -> torch.Tensor:
    """Switch Transformer's auxiliary loss as Mixtral computes it, E * sum_e f_e * P_e (f_e: the share of
    (token, slot) assignments to expert e times k; P_e: the mean router probability of e), taken per
    sequence and averaged over the `num_sequences` equal-length sequences the N tokens hold (as DeepSeek's
    sequence-wise loss does). Per sequence, it is the same however a batch is split over data-parallel
    ranks. k when routing is perfectly uniform. probs (N, E), expert_ids (N, k).

    When each sequence is split over ranks (sequence parallelism), `sum_over_shards` adds the per-sequence
    counts and probability sums of all its shards, so every rank computes the whole sequences' loss."""
    num_tokens, num_experts = probs.shape
    per_sequence = num_tokens // num_sequences
    ids = expert_ids.reshape(num_sequences, -1)  # (B, T*k)
    counts = torch.zeros(num_sequences, num_experts, device=probs.device, dtype=probs.dtype)
    counts.scatter_add_(1, ids, torch.ones(ids.shape, device=probs.device, dtype=probs.dtype))
    if sum_over_shards is None:
        mean_probs = probs.view(num_sequences, per_sequence, num_experts).mean(dim=1)  # (B, E)
        return num_experts * (counts / per_sequence * mean_probs).sum(dim=-1).mean()
    counts = sum_over_shards(counts)
    prob_sums = sum_over_shards(probs.view(num_sequences, per_sequence, num_experts).sum(dim=1))  # (B, E)
    per_sequence = counts[0].sum() / expert_ids.shape[1]  # tokens of a whole sequence
    return num_experts * (counts / per_sequence * prob_sums / per_sequence).sum(dim=-1).mean()


def router_z_loss(router_logits: torch.Tensor, sum_over_shards: SumOverShards | None = None) -> torch.Tensor:
    """ST-MoE's z-loss: mean squared log-partition of the router logits; keeps them small and stable.
    `sum_over_shards` as in `load_balancing_loss`: the mean over every shard's tokens."""
    squares = torch.logsumexp(router_logits.float(), dim=-1).pow(2)
    if sum_over_shards is None:
        return squares.mean()
    total = sum_over_shards(torch.stack([squares.sum(), squares.new_tensor(squares.numel())]))
    return total[0] / total[1]


class MoE(nn.Module):
    """Routed experts (+ shared experts) in place of a dense MLP: (B, T, hidden) -> (B, T, hidden)."""

    def __init__(self, config: ModelConfig, kernels: KernelChoice = "torch") -> None:
        super().__init__()
        self.kernels = check_kernels(kernels)
        self.top_k = config.num_experts_per_token
        self.renormalize = config.router_renormalize
        self.aux_loss_coef = config.router_aux_loss_coef
        self.z_loss_coef = config.router_z_loss_coef
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(config)
        self.shared = None
        self.shared_gate = None
        if config.shared_expert_intermediate_size:
            shared_config = config.replace(
                intermediate_size=config.shared_expert_intermediate_size, mlp_bias=False, num_experts=0
            )
            self.shared = MLP(shared_config, kernels)
            if config.shared_expert_gate:
                self.shared_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.use_reference = False  # tests: run the dense-loop reference instead of the grouped path
        # Sequence parallelism (kiln/train/expert_parallel.py) sets this: the sum of a tensor over the ranks
        # holding the other slices of the same sequences, so the aux losses cover whole sequences.
        self.sum_over_sequence_shards: SumOverShards | None = None
        self.aux_loss: torch.Tensor | None = None  # weighted aux losses of the last training forward
        self.last_expert_counts: torch.Tensor | None = None  # (E,) assignments per expert, last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])  # (N, hidden)
        logits = self.router(rows)  # (N, E)
        probs, weights, expert_ids = route(logits, self.top_k, self.renormalize)
        if self.use_reference:
            out = reference_experts(rows, expert_ids, weights, self.experts)
        else:
            out = self.experts(rows, expert_ids, weights)
        if self.shared is not None:
            shared = self.shared(rows)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(rows)) * shared
            out = out + shared
        self.aux_loss = None
        if self.training:
            num_sequences = shape[0] if len(shape) == 3 else 1
            shards = self.sum_over_sequence_shards
            balance = load_balancing_loss(probs, expert_ids, num_sequences, shards)
            self.aux_loss = self.aux_loss_coef * balance
            if self.z_loss_coef:
                self.aux_loss = self.aux_loss + self.z_loss_coef * router_z_loss(logits, shards)
            self.last_expert_counts = torch.bincount(expert_ids.reshape(-1), minlength=probs.shape[1])
        return out.view(shape)
