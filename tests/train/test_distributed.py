"""`kiln train` under torchrun on CPU (gloo): FSDP2, TP and DDP match one process on the same global batch,
checkpoints reshard across layouts, a killed rank restarts from the last complete checkpoint, a hung rank
fails the job, and `kiln export` turns any checkpoint into an HF model."""

import shutil
import subprocess
import sys

import pytest
import torch

import kiln
from kiln.train import checkpoint, faults
from tests.train.torchrun import assert_close, losses, ok, prepare_data, train, val_losses

STEPS = 20
CHECKPOINTS = ("--set", "checkpoint_every=10", "--set", "keep_checkpoints=2")


def unwrapped(text: str) -> str:
    """Console output with rich's line wrapping undone (it folds long paths mid-word)."""
    return text.replace("\n", "")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def single_run(data_dir, tmp_path_factory):
    """One process, 8 sequences per step: the reference every layout must reproduce."""
    out = tmp_path_factory.mktemp("single")
    ok(train(1, data_dir, out, "--set", "batch_size=8", *CHECKPOINTS, max_steps=STEPS))
    return out


@pytest.fixture(scope="module")
def single_run_10(data_dir, tmp_path_factory):
    """The reference for 10-step runs (the learning-rate schedule depends on max_steps)."""
    out = tmp_path_factory.mktemp("single10")
    ok(train(1, data_dir, out, "--set", "batch_size=8"))
    return out


@pytest.fixture(scope="module")
def fsdp_run(data_dir, tmp_path_factory):
    """2-way FSDP (dp_shard defaults to the world size), 4 sequences per rank: the same global batch."""
    out = tmp_path_factory.mktemp("fsdp")
    result = ok(train(2, data_dir, out, "--set", "batch_size=4", *CHECKPOINTS, max_steps=STEPS))
    assert "FSDP 2" in result.stderr
    return out


def test_fsdp_matches_single_process(single_run, fsdp_run):
    assert len(losses(fsdp_run)) == STEPS  # rank 0 alone writes metrics
    assert_close(losses(fsdp_run), losses(single_run))
    assert_close(val_losses(fsdp_run), val_losses(single_run))


def test_tensor_parallel_matches_single_process(data_dir, single_run_10, tmp_path):
    # The tiny recipe ties embeddings: the tied (V, H) table is split by vocabulary for both uses.
    result = ok(train(2, data_dir, tmp_path, "--tp", "2", "--dp-shard", "1", "--set", "batch_size=8"))
    assert "TP 2" in result.stderr
    assert_close(losses(tmp_path), losses(single_run_10))
    assert_close(val_losses(tmp_path), val_losses(single_run_10))


def test_ddp_with_goldfish_matches_single_process(data_dir, tmp_path):
    # Goldfish drops different numbers of targets on each rank; the global mean weights ranks by them.
    goldfish = ("--goldfish-k", "3", "--goldfish-h", "4")
    ok(train(1, data_dir, tmp_path / "single", *goldfish, "--set", "batch_size=8"))
    result = train(2, data_dir, tmp_path / "ddp", *goldfish, "--dp-replicate", "2", "--set", "batch_size=4")
    assert "DDP 2" in ok(result).stderr
    assert_close(losses(tmp_path / "ddp"), losses(tmp_path / "single"))


def _copy_checkpoint(run, step, out_dir):
    name = checkpoint.checkpoint_name(step)
    shutil.copytree(run / "checkpoints" / name, out_dir / "checkpoints" / name)


def test_fsdp_checkpoint_resumes_in_one_process(data_dir, single_run, fsdp_run, tmp_path):
    _copy_checkpoint(fsdp_run, 10, tmp_path)
    # batch_size stays at the recipe's 4: resuming keeps the checkpoint's global batch of 8 by itself.
    result = ok(train(1, data_dir, tmp_path, "--resume", "--set", "batch_size=4", max_steps=STEPS))
    assert "one data-parallel rank takes all 8" in unwrapped(result.stderr)
    resumed = losses(tmp_path)
    assert sorted(resumed) == list(range(11, STEPS + 1))
    assert_close(resumed, losses(fsdp_run))
    assert_close(resumed, losses(single_run))


def test_fsdp_checkpoint_resumes_under_tensor_parallel(data_dir, fsdp_run, tmp_path):
    _copy_checkpoint(fsdp_run, 10, tmp_path)
    tp = ("--tp", "2", "--dp-shard", "1", "--set", "batch_size=8")
    ok(train(2, data_dir, tmp_path, "--resume", *tp, max_steps=STEPS))
    resumed = losses(tmp_path)
    assert sorted(resumed) == list(range(11, STEPS + 1))
    assert_close(resumed, losses(fsdp_run))


def test_export_turns_a_sharded_checkpoint_into_an_hf_model(fsdp_run, tmp_path):
    import transformers

    result = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "export", str(fsdp_run), str(tmp_path / "hf")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "step-00000020" in result.stdout  # a run folder exports its newest complete checkpoint
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "hf").iterdir()
    }
    ours = kiln.load_model(tmp_path / "hf")
    gathered = kiln.load_model(fsdp_run / "model")  # the job's own export, gathered from both ranks
    for (name, a), b in zip(ours.state_dict().items(), gathered.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-4


def test_rank_killed_mid_checkpoint_restarts_from_the_last_complete_one(data_dir, fsdp_run, tmp_path):
    # Rank 1 dies after writing its shards of step 10 but before every rank has: step 10 must never be
    # marked complete, and torchrun's restart resumes from step 5.
    env = {faults.CRASH_DURING_CHECKPOINT: "10", faults.FAULT_RANK: "1"}
    every_5 = ("--set", "batch_size=4", "--set", "checkpoint_every=5")
    result = ok(train(2, data_dir, tmp_path, *every_5, max_steps=STEPS, max_restarts=1, env=env))
    assert f"resuming from {tmp_path / 'checkpoints' / 'step-00000005'}" in unwrapped(result.stderr)
    assert losses(tmp_path)[STEPS] == losses(fsdp_run)[STEPS]


def test_rank_killed_mid_run_restarts_and_finishes_like_an_uninterrupted_run(data_dir, fsdp_run, tmp_path):
    env = {faults.CRASH_AFTER_STEP: "13", faults.FAULT_RANK: "1"}
    batch = ("--set", "batch_size=4", *CHECKPOINTS)
    result = ok(train(2, data_dir, tmp_path, *batch, max_steps=STEPS, max_restarts=1, env=env))
    assert f"resuming from {tmp_path / 'checkpoints' / 'step-00000010'}" in unwrapped(result.stderr)
    assert losses(tmp_path)[STEPS] == losses(fsdp_run)[STEPS]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "checkpoints")][-1] == "step-00000020"


def test_hung_rank_fails_the_job_after_the_collective_timeout(data_dir, tmp_path):
    env = {faults.HANG_AFTER_STEP: "3", faults.FAULT_RANK: "1"}
    result = train(2, data_dir, tmp_path, "--collective-timeout-s", "5", env=env, timeout=120)
    assert result.returncode != 0
    message = unwrapped(result.stderr)
    assert "rank 0: a collective failed after step 3 (Timed out" in message
    assert "collective_timeout_s=5" in message


FOUR_PROCESS_LAYOUTS = {
    "hsdp": ("--dp-replicate", "2", "--dp-shard", "2", "--set", "batch_size=2"),
    "fsdp+tp": ("--dp-shard", "2", "--tp", "2", "--set", "batch_size=4"),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", FOUR_PROCESS_LAYOUTS.values(), ids=FOUR_PROCESS_LAYOUTS.keys())
def test_four_process_layouts_match_single_process(data_dir, single_run_10, tmp_path, layout):
    ok(train(4, data_dir, tmp_path, *layout))
    assert_close(losses(tmp_path), losses(single_run_10))
