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


def _expert_mlp(x: torch.Tensor, experts: Experts, e: int) -> torch.Tensor:
    """SwiGLU of expert `e` on rows x (n, hidden) -> (n, hidden)."""
    return F.linear(F.silu(F.linear(x, experts.gate_proj[e])) * F.linear(x, experts.up_proj[e]), experts.down_proj[e])


def grouped_experts(
    x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, experts: Experts
) -> torch.Tensor:
    """x (N, hidden), expert_ids and weights (N, k) -> sum_k weights * expert(x), (N, hidden).

    Assignments are sorted by expert (stable, so ties keep token order), the tokens gathered once into
    that order, and each expert multiplies its contiguous slice. An expert with no tokens runs on an empty
    slice: its weights still take part in the graph (zero gradients), which DDP and FSDP need.
    """
    num_tokens, top_k = expert_ids.shape
    flat = expert_ids.reshape(-1)  # (N*k,)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts.gate_proj.shape[0]).tolist()
    gathered = x[order // top_k]  # (N*k, hidden), grouped by expert
    outputs = [_expert_mlp(rows, experts, e) for e, rows in enumerate(gathered.split(counts))]
    grouped = torch.cat(outputs)  # (N*k, hidden) in sorted order
    unsorted = grouped[torch.argsort(order)].view(num_tokens, top_k, -1)  # back to (token, slot)
    # Sum over the k slots in slot order: a token's result does not depend on the rest of the batch.
    return (unsorted * weights.to(x.dtype).unsqueeze(-1)).sum(dim=1)


def reference_experts(
    x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, experts: Experts
) -> torch.Tensor:
    """The dense-loop reference of `grouped_experts`: every expert on every token, masked by its weight."""
    out = torch.zeros_like(x)
    for e in range(experts.gate_proj.shape[0]):
        weight_of_e = (weights * (expert_ids == e)).sum(dim=-1, keepdim=True).to(x.dtype)  # (N, 1)
        out = out + weight_of_e * _expert_mlp(x, experts, e)
    return out


def load_balancing_loss(probs: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's auxiliary loss as Mixtral computes it: E * sum_e f_e * P_e, where f_e is the
    share of (token, slot) assignments to expert e times k, and P_e the mean router probability of e.
    1.0 * k when routing is perfectly uniform."""
    num_tokens, num_experts = probs.shape
    counts = torch.zeros(num_experts, device=probs.device).scatter_add_(
        0, expert_ids.reshape(-1), torch.ones(expert_ids.numel(), device=probs.device)
    )
    return num_experts * torch.sum(counts / num_tokens * probs.mean(dim=0))


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: mean squared log-partition of the router logits; keeps them small and stable."""
    return torch.logsumexp(router_logits.float(), dim=-1).pow(2).mean()


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
        self.aux_loss: torch.Tensor | None = None  # weighted aux losses of the last training forward
        self.last_expert_counts: torch.Tensor | None = None  # (E,) assignments per expert, last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])  # (N, hidden)
        logits = self.router(rows)  # (N, E)
        probs, weights, expert_ids = route(logits, self.top_k, self.renormalize)
        compute = reference_experts if self.use_reference else grouped_experts
        out = compute(rows, expert_ids, weights, self.experts)
        if self.shared is not None:
            shared = self.shared(rows)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(rows)) * shared
            out = out + shared
        self.aux_loss = None
        if self.training:
            self.aux_loss = self.aux_loss_coef * load_balancing_loss(probs, expert_ids)
            if self.z_loss_coef:
                self.aux_loss = self.aux_loss + self.z_loss_coef * router_z_loss(logits)
            self.last_expert_counts = torch.bincount(expert_ids.reshape(-1), minlength=probs.shape[1])
        return out.view(shape)
