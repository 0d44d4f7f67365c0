"""Expert parallelism under torchrun on CPU (gloo): EP 2, EP 2 x DP 2, EP 2 x TP 2 and EP 2 under HSDP
(--dp-replicate 2) match one process on the same global batch, an EP 2 checkpoint resumes under EP 1 (one
process) and EP 4 (and an EP 2 x TP 2 one in one process), and the job exports an HF Mixtral model; layouts
that cannot hold are refused."""

import shutil

import pytest
import torch

import kiln
from kiln.errors import KilnError
from kiln.train import checkpoint
from kiln.train.layout import ParallelLayout
from tests.train.torchrun import assert_close, losses, ok, prepare_data, train, val_losses

STEPS = 20
CHECKPOINTS = ("--set", "checkpoint_every=10", "--set", "keep_checkpoints=2")
MOE = (
    "--set",
    "model.num_experts=4",
    "--set",
    "model.num_experts_per_token=2",
    "--set",
    "model.router_z_loss_coef=0.001",
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def single_run(data_dir, tmp_path_factory):
    """The MoE tiny model in one process, 8 sequences per step: the reference."""
    out = tmp_path_factory.mktemp("single")
    ok(train(1, data_dir, out, *MOE, "--set", "batch_size=8", *CHECKPOINTS, max_steps=STEPS, timeout=600))
    return out


@pytest.fixture(scope="module")
def ep2_run(data_dir, tmp_path_factory):
    """2 processes, FSDP 2 + EP 2 (two experts per rank), 4 sequences per rank."""
    out = tmp_path_factory.mktemp("ep2")
    result = ok(
        train(2, data_dir, out, *MOE, "--ep", "2", "--set", "batch_size=4", *CHECKPOINTS, max_steps=STEPS)
    )
    assert "FSDP 2 + EP 2" in result.stderr
    return out


def _copy_checkpoint(run, step, out_dir):
    name = checkpoint.checkpoint_name(step)
    shutil.copytree(run / "checkpoints" / name, out_dir / "checkpoints" / name)


def test_ep2_matches_single_process(single_run, ep2_run):
    assert len(losses(ep2_run)) == STEPS
    assert_close(losses(ep2_run), losses(single_run))
    assert_close(val_losses(ep2_run), val_losses(single_run))


@pytest.mark.slow
def test_ep2_checkpoint_resumes_in_one_process(data_dir, ep2_run, tmp_path):
    _copy_checkpoint(ep2_run, 10, tmp_path)
    ok(train(1, data_dir, tmp_path, *MOE, "--resume", "--set", "batch_size=4", max_steps=STEPS))
    resumed = losses(tmp_path)
    assert sorted(resumed) == list(range(11, STEPS + 1))
    assert_close(resumed, losses(ep2_run))


@pytest.mark.slow
def test_ep2_job_exports_a_mixtral_model(single_run, ep2_run):
    import transformers

    ours = kiln.load_model(ep2_run / "model")
    assert ours.config.family == "mixtral" and ours.config.num_experts == 4
    reference = kiln.load_model(single_run / "model")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(ep2_run / "model").eval()
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-4
        assert (ours(ids) - reference(ids)).abs().max() <= 1e-3


@pytest.mark.slow
def test_ep2_checkpoint_resumes_under_ep4(data_dir, ep2_run, tmp_path):
    _copy_checkpoint(ep2_run, 10, tmp_path)
    ep4 = ("--ep", "4", "--set", "batch_size=2")
    ok(train(4, data_dir, tmp_path, *MOE, "--resume", *ep4, max_steps=STEPS))
    resumed = losses(tmp_path)
    assert sorted(resumed) == list(range(11, STEPS + 1))
    assert_close(resumed, losses(ep2_run))


@pytest.mark.slow
def test_ep2_by_dp2_matches_single_process(data_dir, single_run, tmp_path):
    # 4 processes: dp_shard 4 = 2 (replicas of each expert, dp_shard_mod_ep) x 2 (ep)
    result = ok(train(4, data_dir, tmp_path, *MOE, "--ep", "2", "--set", "batch_size=2", max_steps=STEPS))
    assert "FSDP 4 + EP 2" in result.stderr
    assert_close(losses(tmp_path), losses(single_run))


@pytest.fixture(scope="module")
def ep2_tp2_run(data_dir, tmp_path_factory):
    """4 processes: dp_shard 2 (= ep 2) x tp 2; each tp rank routes its half of every sequence."""
    out = tmp_path_factory.mktemp("ep2tp2")
    extra = ("--ep", "2", "--tp", "2", "--set", "batch_size=4", *CHECKPOINTS)
    result = ok(train(4, data_dir, out, *MOE, *extra, max_steps=STEPS, timeout=600))
    assert "FSDP 2 + TP 2 + EP 2" in result.stderr
    return out


@pytest.mark.slow
def test_ep2_by_tp2_matches_single_process(single_run, ep2_tp2_run):
    assert len(losses(ep2_tp2_run)) == STEPS
    assert_close(losses(ep2_tp2_run), losses(single_run))
    assert_close(val_losses(ep2_tp2_run), val_losses(single_run))


@pytest.mark.slow
def test_ep2_by_tp2_checkpoint_resumes_in_one_process(data_dir, ep2_tp2_run, tmp_path):
    _copy_checkpoint(ep2_tp2_run, 10, tmp_path)
    ok(train(1, data_dir, tmp_path, *MOE, "--resume", "--set", "batch_size=8", max_steps=STEPS, timeout=600))
    resumed = losses(tmp_path)
    assert sorted(resumed) == list(range(11, STEPS + 1))
    assert_close(resumed, losses(ep2_tp2_run))


@pytest.mark.slow
def test_ep2_under_hsdp_matches_single_process(data_dir, single_run, tmp_path):
    # 4 processes: dp_replicate 2 x dp_shard 2 (= ep 2); experts replicate over dp_replicate
    extra = ("--ep", "2", "--dp-replicate", "2", "--set", "batch_size=2")
    result = ok(train(4, data_dir, tmp_path, *MOE, *extra, max_steps=STEPS, timeout=600))
    assert "HSDP 2x2 + EP 2" in result.stderr
    assert len(losses(tmp_path)) == STEPS
    assert_close(losses(tmp_path), losses(single_run))


def test_layouts_expert_parallelism_cannot_hold_are_refused():
    with pytest.raises(KilnError, match="must divide dp_shard"):
        ParallelLayout(dp_shard=3, ep=2)
    # EP borrows from dp_shard, so it combines with tp and dp_replicate
    assert ParallelLayout(dp_shard=2, tp=2, ep=2).describe() == "FSDP 2 + TP 2 + EP 2"
    assert ParallelLayout(dp_replicate=2, dp_shard=2, ep=2).describe() == "HSDP 2x2 + EP 2"


def test_ep_must_divide_the_experts_of_an_moe_model():
    moe = kiln.preset("tiny", num_experts=6)
    ParallelLayout(dp_shard=2, ep=2).check_model(moe, 256)
    with pytest.raises(KilnError, match="must divide the model's num_experts"):
        ParallelLayout(dp_shard=4, ep=4).check_model(moe, 256)
    with pytest.raises(KilnError, match="dense model"):
        ParallelLayout(dp_shard=2, ep=2).check_model(kiln.preset("tiny"), 256)
    ParallelLayout(dp_shard=2, tp=2, ep=2).check_model(moe, 256)
    with pytest.raises(KilnError, match="tp=2 must divide seq_len=255"):
        ParallelLayout(dp_shard=2, tp=2, ep=2).check_model(moe, 255)
