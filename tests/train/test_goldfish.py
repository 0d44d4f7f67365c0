"""Goldfish loss: ~1/K of targets dropped, the same way for the same passage, and it stops verbatim recall."""

import pytest
import torch

import kiln
from kiln.generation import GenerationConfig, generate
from kiln.train.config import TrainConfig
from kiln.train.losses import IGNORE_INDEX, goldfish_mask, language_model_loss
from kiln.train.trainer import Trainer
from tests.train.memory_data import MemoryData


@pytest.mark.parametrize("k", [2, 4, 7])
def test_masked_fraction_is_about_one_in_k(k):
    tokens = torch.randint(0, 32000, (8, 4096), generator=torch.Generator().manual_seed(k))
    mask = goldfish_mask(tokens, k=k, h=13)
    assert not mask[:, :12].any()  # too little context: never dropped
    assert mask[:, 12:].float().mean().item() == pytest.approx(1 / k, rel=0.05)


def test_repeated_passages_get_identical_masks():
    passage = torch.randint(0, 5000, (300,), generator=torch.Generator().manual_seed(0))
    noise = torch.randint(0, 5000, (77,), generator=torch.Generator().manual_seed(1))
    stream = torch.cat([passage, noise, passage, passage])[None]
    mask = goldfish_mask(stream, k=4, h=8)[0]
    first, second, third = mask[7:300], mask[377 + 7 : 677], mask[677 + 7 : 977]
    assert torch.equal(first, second) and torch.equal(first, third) and first.any()
    # A window starting mid-passage agrees wherever it has the full context.
    window = goldfish_mask(passage[None, 50:], k=4, h=8)[0]
    assert torch.equal(window[7:], mask[57:300])


def test_loss_ignores_dropped_targets():
    logits = torch.randn(2, 64, 11)
    targets = torch.randint(0, 11, (2, 64))
    inputs = torch.randint(0, 11, (2, 64))
    loss, kept = language_model_loss(logits, targets, inputs, goldfish_k=3, goldfish_h=4)
    masked = targets.masked_fill(goldfish_mask(inputs, 3, 4), IGNORE_INDEX)
    expected = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), masked.flatten(), ignore_index=IGNORE_INDEX
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6) and kept == int(
        (masked != IGNORE_INDEX).sum()
    )


def _memorization(tmp_path, goldfish_k: int) -> tuple[float, float]:
    """Train on 4 short passages for many epochs; return (verbatim passage rate, matching token rate)."""
    generator = torch.Generator().manual_seed(0)
    passages = [torch.randint(3, 1024, (64,), generator=generator) for _ in range(4)]
    tokens = torch.cat(passages)
    config = TrainConfig(
        model=kiln.preset("tiny", hidden_size=96, num_heads=4, num_kv_heads=2),
        data_dir="-",
        out_dir=str(tmp_path),
        max_steps=120,
        seq_len=63,
        batch_size=4,
        lr=1e-2,
        min_lr=1e-3,
        warmup_steps=10,
        weight_decay=0.0,
        eval_every=0,
        checkpoint_every=0,
        export=False,
        goldfish_k=goldfish_k,
        goldfish_h=8,
    )
    trainer = Trainer(config, train_data=MemoryData(tokens, 63, 4, starts=[0, 64, 128, 192]))
    for _ in range(config.max_steps):
        trainer.train_step()
    model = trainer.model.eval()
    prompts = [p[:16].tolist() for p in passages]
    outputs = generate(model, prompts, GenerationConfig(max_new_tokens=48))
    verbatim = sum(out == p[16:].tolist() for out, p in zip(outputs, passages, strict=True)) / 4
    matching = (
        sum(
            (torch.tensor(out) == p[16:]).float().mean().item()
            for out, p in zip(outputs, passages, strict=True)
        )
        / 4
    )
    return verbatim, matching


def test_goldfish_prevents_verbatim_memorization(tmp_path, capsys):
    plain = _memorization(tmp_path / "plain", goldfish_k=0)
    goldfish = _memorization(tmp_path / "goldfish", goldfish_k=4)
    with capsys.disabled():
        print(
            f"\nmemorization: without goldfish verbatim {plain[0]:.0%}, tokens {plain[1]:.0%}; "
            f"goldfish k=4 verbatim {goldfish[0]:.0%}, tokens {goldfish[1]:.0%}"
        )
    assert plain[0] == 1.0  # every passage reproduced exactly
    assert goldfish[0] == 0.0 and goldfish[1] < plain[1] - 0.3
