"""The training loop: exact resume, schedule, accumulation, non-finite steps, mixed precision."""

import math

import pytest
import torch

import kiln
from kiln.train.config import TrainConfig
from kiln.train.optim import learning_rate
from kiln.train.trainer import Trainer
from tests.train.memory_data import MemoryData

# A 600-token passage repeated: learnable, so losses fall within a few steps.
TOKENS = torch.randint(0, 1024, (600,), generator=torch.Generator().manual_seed(0)).repeat(50)


def make_trainer(tmp_path, **overrides):
    values = dict(
        model=kiln.preset("tiny"),
        data_dir="-",
        out_dir=str(tmp_path),
        max_steps=20,
        seq_len=32,
        batch_size=4,
        warmup_steps=3,
        eval_every=0,
        checkpoint_every=0,
        log_every=5,
        export=False,
    )
    config = TrainConfig(**(values | overrides))
    return Trainer(config, train_data=MemoryData(TOKENS, 32, 4), val_data=MemoryData(TOKENS, 32, 4, seed=1))


def params(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_resume_is_bitwise_exact(tmp_path):
    straight = make_trainer(tmp_path / "a")
    straight_losses = [straight.train_step().loss for _ in range(20)]

    first = make_trainer(tmp_path / "b")
    resumed_losses = [first.train_step().loss for _ in range(10)]
    first.save_checkpoint()
    torch.manual_seed(1234)  # resuming must not depend on the fresh process's RNG
    second = make_trainer(tmp_path / "b")
    assert second.resume() is not None and second.step == 10
    resumed_losses += [second.train_step().loss for _ in range(10)]

    assert resumed_losses == straight_losses
    after, expected = params(second), params(straight)
    assert all(torch.equal(after[k], expected[k]) for k in expected)
    for group_a, group_b in zip(
        second.optimizer.state.values(), straight.optimizer.state.values(), strict=True
    ):
        assert torch.equal(group_a["exp_avg_sq"], group_b["exp_avg_sq"])


def test_training_reduces_loss_and_writes_checkpoints(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=30, checkpoint_every=10, keep_checkpoints=2, eval_every=10)
    summary = trainer.train()
    assert summary.steps == 30 and summary.tokens == 30 * 4 * 32
    assert summary.losses[-1] < summary.losses[0]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000020", "step-00000030"]
    assert summary.val_loss is not None and summary.tokens_per_second > 0 and 0 < summary.mfu


def test_warmup_then_cosine_schedule():
    lrs = [learning_rate(s, max_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))


def test_gradient_accumulation_matches_a_big_batch(tmp_path):
    big = make_trainer(tmp_path / "big", batch_size=8)
    big.train_data = MemoryData(TOKENS, 32, 8, starts=list(range(0, 8000, 100)))
    small = make_trainer(tmp_path / "small", batch_size=4, grad_accum_steps=2)
    small.train_data = MemoryData(TOKENS, 32, 4, starts=list(range(0, 8000, 100)))
    for _ in range(3):
        a, b = big.train_step(), small.train_step()
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
    for name, value in params(big).items():
        torch.testing.assert_close(value, params(small)[name], rtol=1e-4, atol=1e-6)


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path):
    trainer = make_trainer(tmp_path, max_bad_steps=3, checkpoint_every=2)
    trainer.train_step()
    trainer.train_step()
    good = trainer.save_checkpoint()
    before = params(trainer)
    with torch.no_grad():
        trainer.model.norm.weight.fill_(float("nan"))
    result = trainer.train_step()
    assert result.skipped and math.isnan(result.loss)
    with pytest.raises(kiln.KilnError, match=r"3 non-finite steps in a row.*step-00000002"):
        trainer.train()
    assert good.is_dir()
    fresh = make_trainer(tmp_path)
    fresh.resume()
    assert all(torch.equal(v, before[k]) for k, v in params(fresh).items())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, precision):
    trainer = make_trainer(tmp_path, precision=precision, lr=3e-3)
    losses = [trainer.train_step().loss for _ in range(15)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert trainer.model.embed_tokens.weight.dtype == torch.float32  # master weights stay fp32


def _gradients(trainer) -> dict[str, torch.Tensor]:
    """Every parameter's gradient for the micro-batch of the trainer's next step, by state-dict name."""
    inputs, targets = trainer._batch(trainer.train_data, trainer.step)
    trainer._forward_backward(inputs, targets)
    names = [name.replace("_checkpoint_wrapped_module.", "") for name, _ in trainer.model.named_parameters()]
    grads = {name: p.grad.clone() for name, p in zip(names, trainer.model.parameters(), strict=True)}
    trainer.optimizer.zero_grad(set_to_none=True)
    return grads


def test_activation_checkpointing_gives_the_same_gradients(tmp_path):
    plain = make_trainer(tmp_path / "a")
    checkpointed = make_trainer(tmp_path / "b", activation_checkpointing=True)
    assert any(type(m).__name__ == "CheckpointWrapper" for m in checkpointed.model.modules())
    for _ in range(3):
        expected, got = _gradients(plain), _gradients(checkpointed)
        assert got.keys() == expected.keys() == params(plain).keys()
        for name, grad in expected.items():
            assert grad.abs().sum() > 0, name
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)
        assert plain.train_step().loss == pytest.approx(checkpointed.train_step().loss, rel=1e-6)
    for name, value in params(plain).items():
        torch.testing.assert_close(params(checkpointed)[name], value, rtol=1e-5, atol=1e-7)


def test_config_overrides_and_validation():
    config = TrainConfig(model=kiln.preset("tiny"), data_dir="d")
    changed = config.override(
        ["lr=3e-4", "max_steps=50", "precision=bf16", "model.num_layers=3", "compile=true"]
    )
    assert (changed.lr, changed.max_steps, changed.precision, changed.model.num_layers) == (
        3e-4,
        50,
        "bf16",
        3,
    )
    assert changed.compile is True
    with pytest.raises(kiln.KilnError, match="unknown setting 'bogus'"):
        config.override(["bogus=1"])
    with pytest.raises(kiln.KilnError, match="expected a int"):
        config.override(["max_steps=many"])
    with pytest.raises(kiln.KilnError, match="goldfish_k must be 0"):
        TrainConfig(model=kiln.preset("tiny"), data_dir="d", goldfish_k=1)
    with pytest.raises(kiln.KilnError, match="seq_len 4096 exceeds"):
        TrainConfig(model=kiln.preset("tiny"), data_dir="d", seq_len=4096)
    with pytest.raises(kiln.KilnError, match="kernels must be one of torch, triton, auto"):
        TrainConfig(model=kiln.preset("tiny"), data_dir="d", kernels="cuda")
    assert config.kernels == "auto" and config.override(["kernels=triton"]).kernels == "triton"


def test_overriding_the_width_resizes_heads_and_mlp_that_follow_the_default_rule():
    config = TrainConfig(model=kiln.preset("tiny"), data_dir="d")  # head_dim 16, intermediate 192: defaults
    wider = config.override(["model.hidden_size=128"]).model
    assert (wider.head_dim, wider.intermediate_size) == (32, 384)
    explicit = config.override(["model.hidden_size=128", "model.head_dim=8"]).model
    assert explicit.head_dim == 8
    custom = TrainConfig(model=kiln.preset("tiny", intermediate_size=100), data_dir="d")
    assert custom.override(["model.hidden_size=128"]).model.intermediate_size == 100  # chosen, so kept
