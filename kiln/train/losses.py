"""Training losses: next-token cross-entropy, with the Goldfish mask as an option.

Goldfish loss (Hans et al., 2024, "Be like a Goldfish, Don't Memorize!") drops the loss on about one
target token in K, chosen by a hash of the H tokens before it. Because the choice depends only on
those tokens, a passage seen again (another epoch, another copy) is masked the same way each time,
so the model never receives the gradient that would let it reproduce the passage verbatim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.kernels.linear_cross_entropy import linear_cross_entropy

IGNORE_INDEX = -100
_HASH_PRIME = 2_147_483_647  # 2^31 - 1: products of token ids (< 2^20) and powers stay inside int64
_HASH_BASE = 1_000_003
_MIX = 0x9E3779B1  # golden-ratio multiplier spreads nearby sums before the final modulus


def goldfish_mask(inputs: torch.Tensor, k: int, h: int) -> torch.Tensor:
    """Bool (B, T): True where the target at that position is dropped.

    The target at position t is the token after inputs[:, t]; its context is inputs[:, t-h+1 : t+1].
    Positions with fewer than h tokens of context in the window are never dropped, so the decision for
    a token does not depend on where a training window happens to start.
    """
    if k < 2 or h < 1:
        raise ValueError(f"goldfish needs k >= 2 and h >= 1, got k={k}, h={h}")
    batch, length = inputs.shape
    dropped = torch.zeros(batch, length, dtype=torch.bool, device=inputs.device)
    if length < h:
        return dropped
    windows = inputs.long().unfold(1, h, 1)  # (B, T - h + 1, h)
    powers = torch.tensor([pow(_HASH_BASE, i, _HASH_PRIME) for i in range(h)], device=inputs.device)
    hashed = (windows * powers).sum(-1) % _HASH_PRIME
    hashed = (hashed * _MIX) % _HASH_PRIME
    dropped[:, h - 1 :] = hashed % k == 0
    return dropped


def language_model_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    inputs: torch.Tensor | None = None,
    goldfish_k: int = 0,
    goldfish_h: int = 13,
) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the kept targets, and how many targets were kept.

    logits (B, T, V), targets (B, T). With goldfish_k >= 2, the Goldfish mask (from `inputs`) drops
    about 1/goldfish_k of the targets; targets equal to IGNORE_INDEX are always dropped.
    """
    if goldfish_k:
        assert inputs is not None, "goldfish needs the inputs to hash"
        targets = targets.masked_fill(goldfish_mask(inputs, goldfish_k, goldfish_h), IGNORE_INDEX)
    kept = int((targets != IGNORE_INDEX).sum())
    loss = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss / max(kept, 1), kept


def fused_language_model_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    inputs: torch.Tensor | None = None,
    goldfish_k: int = 0,
    goldfish_h: int = 13,
    kernels: str = "torch",
) -> torch.Tensor:
    """`language_model_loss` from final hidden states (B, T, H) and the LM head weight (V, H), through the
    chunked linear + cross-entropy that never materialises the (B, T, V) logits (its Triton kernel when
    `kernels` picks it)."""
    if goldfish_k:
        assert inputs is not None, "goldfish needs the inputs to hash"
        targets = targets.masked_fill(goldfish_mask(inputs, goldfish_k, goldfish_h), IGNORE_INDEX)
    return linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX, kernels=kernels)
