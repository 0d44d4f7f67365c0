"""LanguageModelObjective: the model and its next-token loss as one module.

FSDP and DDP act on a module's forward and backward, and the LM head weight (tied to the embedding or
not) is used by the loss, not by the model's `hidden_states`; computing the loss inside this module's
forward keeps that weight inside the region where FSDP has it unsharded and DDP tracks its gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import loss_parallel

from kiln.models.transformer import Transformer
from kiln.train.losses import IGNORE_INDEX, fused_language_model_loss


class LanguageModelObjective(nn.Module):
    """forward(inputs (B, T), targets (B, T)) -> mean cross-entropy over targets != IGNORE_INDEX.

    Under tensor parallelism (`vocab_parallel`), the hidden states arrive sharded along the sequence and
    the LM head along the vocabulary: the logits stay split by vocabulary (B, T, V/tp) and cross-entropy
    runs on the shards (torch's loss_parallel), so no rank ever holds full logits. Otherwise the fused,
    chunked linear + cross-entropy kernel is used, which never materialises the logits at all.
    """

    def __init__(
        self,
        model: Transformer,
        hidden_states: Callable[..., torch.Tensor] | None = None,
        kernels: str = "torch",
    ):
        super().__init__()
        self.model = model
        self.hidden_states = hidden_states or model.hidden_states  # possibly a torch.compile'd one
        self.kernels = kernels  # of the fused loss; the model has its own switch
        self.vocab_parallel = False

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The cross-entropy, plus in training the MoE layers' weighted router losses (load balancing,
        z-loss) that the forward just recorded, so one backward trains the router too."""
        loss = self._cross_entropy(self.hidden_states(inputs), targets)
        aux = self.model.moe_aux_loss() if self.model.training else None
        if aux is not None and isinstance(loss, DTensor):  # vocab-parallel: the same aux on every tp rank
            aux = DTensor.from_local(aux, loss.device_mesh, [Replicate()], run_check=False)
        return loss if aux is None else loss + aux

    def _cross_entropy(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(hidden, self.model.output_weight, targets, self.vocab_parallel, self.kernels)

    def loss_context(self) -> contextlib.AbstractContextManager:
        """Wrap forward *and* backward in this: vocab-parallel cross-entropy needs it for both."""
        return loss_parallel() if self.vocab_parallel else contextlib.nullcontext()


def cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_parallel: bool, kernels: str
) -> torch.Tensor:
    """Mean next-token cross-entropy from final hidden states (B, T, H) and the LM head weight (V, H):
    the fused linear + cross-entropy, or under tensor parallelism vocab-parallel cross-entropy (call it
    inside `loss_parallel()`, backward included)."""
    if not vocab_parallel:
        return fused_language_model_loss(hidden, weight, targets, kernels=kernels)
    hidden = hidden.redistribute(placements=[Replicate()])  # (B, T/tp, H) -> (B, T, H) on each rank
    logits = F.linear(hidden, weight)  # DTensor (B, T, V) sharded on V
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
