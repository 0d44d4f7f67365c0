"""`kiln finetune` on the Trainer: adapter written in the PEFT format, trainable parameters only in the
optimizer, resume from a checkpoint, `kiln export --merge`; and a slow run that shows both methods learn."""

import json

import pytest
import torch
from typer.testing import CliRunner

import kiln
from kiln.cli import app
from kiln.data.sft import SFTLoader, prepare_sft
from kiln.finetune import LoraConfig, PromptTuningConfig, attach_adapter
from kiln.finetune.evaluation import exact_match, task_loss
from kiln.train.finetune import FinetuneConfig, FinetuneTrainer, finetune_train_config, run_finetune
from tests.finetune.tasks import chat, reverse, split_words, write_jsonl
from tests.hf_cases import build_text_model

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_text_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def task_data(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("task")
    train_words, _ = split_words()
    path = write_jsonl(folder / "do.jsonl", [chat("do", w, reverse(w)) for w in train_words])
    prepare_sft([path], folder / "data", model_dir, val_fraction=0.1)
    return folder / "data"


def test_optimizer_holds_only_the_adapter(model_dir, task_data, tmp_path):
    train = finetune_train_config(str(model_dir), str(task_data), str(tmp_path), max_steps=2, kernels="torch")
    for method, expected in (("lora", 2 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8)), ("prompt", 20 * 64)):
        config = FinetuneConfig(base=str(model_dir), method=method, lora=LoraConfig(rank=8), train=train)
        trainer = FinetuneTrainer(config)
        in_optimizer = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
        assert in_optimizer == expected, method  # lora: q (64 -> 64) and v (64 -> 32) of 2 layers, r=8


def test_cli_finetune_resume_and_merge(model_dir, task_data, tmp_path):
    out = tmp_path / "run"
    base_args = ["finetune", "--base", str(model_dir), "--data", str(task_data), "--out-dir", str(out)]
    args = [*base_args, "--lora-targets", "q,v,down", "--batch-size", "4", "--set", "checkpoint_every=3"]
    result = runner.invoke(app, [*args, "--max-steps", "3"])
    assert result.exit_code == 0, result.output
    assert "trainable parameters" in result.output
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    again = runner.invoke(app, [*args, "--max-steps", "3"])
    assert again.exit_code != 0 and "--resume" in str(again.exception)
    resumed = runner.invoke(app, [*args, "--max-steps", "5", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 5 and (out / "checkpoints" / "step-00000005").is_dir()

    merged = runner.invoke(app, ["export", str(out), str(tmp_path / "merged"), "--merge"])
    assert merged.exit_code == 0, merged.output
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        adapted = attach_adapter(kiln.load_model(model_dir), out / "adapter")(ids)
        assert (kiln.load_model(tmp_path / "merged")(ids) - adapted).abs().max() < 1e-4
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_prompt_adapter_cannot_be_merged(model_dir, task_data, tmp_path):
    result = runner.invoke(
        app,
        ["finetune", "--base", str(model_dir), "--data", str(task_data), "--out-dir", str(tmp_path / "p")]
        + ["--method", "prompt", "--num-virtual-tokens", "4", "--max-steps", "1"],
    )
    assert result.exit_code == 0, result.output
    assert (
        json.loads((tmp_path / "p" / "adapter" / "adapter_config.json").read_text())["num_virtual_tokens"]
        == 4
    )
    merged = runner.invoke(app, ["export", str(tmp_path / "p"), str(tmp_path / "m"), "--merge"])
    assert merged.exit_code != 0 and "no weights to merge" in str(merged.exception)


@pytest.mark.slow
def test_lora_and_prompt_tuning_learn_a_held_out_task(model_dir, tmp_path, capsys):
    """A base that knows `reverse:` and `copy:` (trained here, full finetuning) learns what the unseen
    instruction `do:` means from examples: LoRA and prompt tuning each cut the task loss by >= 50% and
    reach far higher exact match on held-out words than the base."""
    train_words, test_words = split_words()
    mix = [chat(i, w, reverse(w) if i == "reverse" else w) for w in train_words for i in ("reverse", "copy")]
    prepare_sft([write_jsonl(tmp_path / "mix.jsonl", mix)], tmp_path / "mix", model_dir, 0.05)
    do_path = write_jsonl(tmp_path / "do.jsonl", [chat("do", w, reverse(w)) for w in train_words])
    held_out = [chat("do", w, reverse(w)) for w in test_words[:60]]
    prepare_sft([do_path], tmp_path / "do", model_dir, 0.0)
    prepare_sft([write_jsonl(tmp_path / "held.jsonl", held_out)], tmp_path / "held", model_dir, 0.0)

    settings = dict(batch_size=16, log_every=100, eval_every=0, checkpoint_every=0)
    full = finetune_train_config(str(model_dir), str(tmp_path / "mix"), str(tmp_path / "full"), **settings)
    run_finetune(
        FinetuneConfig(base=str(model_dir), method="full", train=full.override(["max_steps=600", "lr=3e-3"]))
    )
    base_dir = tmp_path / "full" / "model"
    tokenizer = kiln.load_tokenizer(base_dir)
    held_batches = [
        SFTLoader(tmp_path / "held", seq_len=40, batch_size=60).collate(
            SFTLoader(tmp_path / "held", seq_len=40, batch_size=60).examples
        )
    ]
    base_model = kiln.load_model(base_dir)
    base_loss, base_match = task_loss(base_model, held_batches), exact_match(base_model, tokenizer, held_out)

    results = {}
    for method, lr, steps in (("lora", 5e-3, 200), ("prompt", 3e-2, 300)):
        train = finetune_train_config(str(base_dir), str(tmp_path / "do"), str(tmp_path / method), **settings)
        config = FinetuneConfig(
            base=str(base_dir),
            method=method,
            lora=LoraConfig(rank=8, targets="q,k,v,o,gate,up,down"),
            prompt=PromptTuningConfig(num_virtual_tokens=8),
            train=train.override([f"max_steps={steps}", f"lr={lr}"]),
        )
        trainer, _ = run_finetune(config)
        adapted = attach_adapter(kiln.load_model(base_dir), trainer.out_dir / "adapter")
        results[method] = (task_loss(adapted, held_batches), exact_match(adapted, tokenizer, held_out))
    with capsys.disabled():
        print(f"\nbase: held-out task loss {base_loss:.3f}, exact match {base_match:.2f}")
        for method, (loss, match) in results.items():
            print(f"{method}: held-out task loss {loss:.3f}, exact match {match:.2f}")
    for method, (loss, match) in results.items():
        assert loss <= 0.5 * base_loss, method
        assert match >= base_match + 0.25, method


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_adapters_train_under_bf16_autocast_and_activation_checkpointing(
    model_dir, task_data, tmp_path, method
):
    settings = ["precision=bf16", "activation_checkpointing=true", "max_steps=3", "eval_every=0"]
    train = finetune_train_config(str(model_dir), str(task_data), str(tmp_path), batch_size=4).override(
        settings
    )
    config = FinetuneConfig(base=str(model_dir), method=method, lora=LoraConfig(dropout=0.1), train=train)
    trainer = FinetuneTrainer(config)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    losses = [trainer.train_step().loss for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(("lora_" in n) or n.endswith("virtual") for n in changed), changed
    adapter = trainer.export()  # the checkpoint wrappers do not leak into PEFT names
    with torch.no_grad():
        ids = torch.randint(0, 300, (1, 9))
        expected = trainer.model.eval()(ids)
        assert (attach_adapter(kiln.load_model(model_dir), adapter)(ids) - expected).abs().max() < 1e-5
