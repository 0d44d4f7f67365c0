"""Greedy completion and exact-match accuracy of an adapted model on chat examples (no KV cache: the
task examples are a few dozen tokens, and the same code runs LoRA and prompt-tuned models)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def greedy_completion(
    model: nn.Module, prompt_ids: Sequence[int], stop_ids: set[int], max_new_tokens: int = 16
) -> list[int]:
    """Greedy tokens after `prompt_ids` until a stop id (not included) or max_new_tokens."""
    device = next(model.parameters()).device
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids], device=device))[0, -1]
        token = int(logits.argmax())
        if token in stop_ids:
            break
        out.append(token)
        ids.append(token)
    return out


@torch.no_grad()
def greedy_completions(
    model: nn.Module, prompts: Sequence[Sequence[int]], stop_ids: set[int], max_new_tokens: int = 16
) -> list[list[int]]:
    """`greedy_completion` of every prompt, prompts of equal length decoded together as one batch (no
    padding, so each row computes exactly what it would alone)."""
    device = next(model.parameters()).device
    groups: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(len(prompt), []).append(index)
    out: list[list[int]] = [[] for _ in prompts]
    for members in groups.values():
        ids = torch.tensor([list(prompts[i]) for i in members], device=device)  # (B, T)
        done = [False] * len(members)
        for _ in range(max_new_tokens):
            tokens = model(ids)[:, -1].argmax(-1)  # (B,)
            for row, token in enumerate(tokens.tolist()):
                if not done[row]:
                    done[row] = token in stop_ids
                    if not done[row]:
                        out[members[row]].append(token)
            if all(done):
                break
            ids = torch.cat([ids, tokens[:, None]], dim=1)
    return out


def exact_match(
    model: nn.Module, tokenizer, examples: Sequence[dict[str, Any]], max_new_tokens: int = 16
) -> float:
    """Fraction of chat examples ({"messages": [..., assistant]}) whose greedy reply equals the last
    assistant message exactly (surrounding whitespace ignored)."""
    was_training = model.training
    model.eval()
    stop_ids = set(tokenizer.eos_token_ids)
    end_of_turn = tokenizer.token_to_id("<|im_end|>")  # ChatML's turn end, an EOS or not
    if end_of_turn is not None:
        stop_ids.add(end_of_turn)
    prompts = [
        tokenizer.apply_chat_template(e["messages"][:-1], add_generation_prompt=True, tokenize=True)
        for e in examples
    ]
    replies = greedy_completions(model, prompts, stop_ids, max_new_tokens)
    hits = sum(
        tokenizer.decode(reply).strip() == example["messages"][-1]["content"].strip()
        for reply, example in zip(replies, examples, strict=True)
    )
    model.train(was_training)
    return hits / max(len(examples), 1)


@torch.no_grad()
def task_loss(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean cross-entropy over the targets (ignore index -100 skipped) of (inputs, targets) batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in batches:
        logits = model(inputs).float()
        losses = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
        )
        total += losses.item()
        count += int((targets != -100).sum())
    model.train(was_training)
    return total / max(count, 1)
