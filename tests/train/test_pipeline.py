"""Pipeline parallelism under torchrun on CPU (gloo): PP 2 / PP 4 (1F1B, interleaved, GPipe), PP x DP,
PP x TP and PP x TP x DP match one process on the same global batch; a PP 2 x TP 2 checkpoint resumes
under PP 1, PP 4 and DP 2; a killed stage restarts bit-identically; bad settings are one-line errors.

The tiny recipe ties its embeddings, so every run here also exercises the tied copy on the last stage."""

import re
import shutil

import pytest

from kiln.config import ModelConfig
from kiln.errors import KilnError
from kiln.recipes import get_recipe
from kiln.train import checkpoint, faults
from kiln.train.pipeline import _balanced_counts, stage_layer_counts
from tests.train.torchrun import assert_close, losses, ok, prepare_data, train, val_losses

STEPS = 20
FOUR_LAYERS = ("--set", "model.num_layers=4")
CHECKPOINTS = ("--set", "checkpoint_every=10", "--set", "keep_checkpoints=2")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def single_run(data_dir, tmp_path_factory):
    """One process, 4 layers, 8 sequences per step, 10 steps: the reference."""
    out = tmp_path_factory.mktemp("single")
    ok(train(1, data_dir, out, *FOUR_LAYERS, "--set", "batch_size=8"))
    return out


@pytest.fixture(scope="module")
def single_run_20(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single20")
    ok(train(1, data_dir, out, *FOUR_LAYERS, "--set", "batch_size=8", max_steps=STEPS))
    return out


def test_pp2_1f1b_matches_single_process(data_dir, single_run, tmp_path):
    result = ok(train(2, data_dir, tmp_path, *FOUR_LAYERS, "--pp", "2", "--set", "batch_size=8"))
    assert "PP 2" in result.stderr
    assert len(losses(tmp_path)) == 10
    assert_close(losses(tmp_path), losses(single_run))
    assert_close(val_losses(tmp_path), val_losses(single_run))
    assert (tmp_path / "model" / "model.safetensors").is_file()  # exported from the final checkpoint


GOLDFISH = ("--goldfish-k", "3", "--goldfish-h", "4")
EIGHT_LAYERS = ("--set", "model.num_layers=8")
INTERLEAVED = ("--pp-schedule", "interleaved-1f1b", "--pp-virtual-stages", "2")
# name: (processes, model and loss flags shared with the single-process reference, layout flags)
LAYOUTS = {
    "pp2-interleaved": (2, FOUR_LAYERS, ("--pp", "2", *INTERLEAVED)),
    "pp2-gpipe-goldfish": (2, (*FOUR_LAYERS, *GOLDFISH), ("--pp", "2", "--pp-schedule", "gpipe")),
    "pp2-untied": (2, (*FOUR_LAYERS, "--set", "model.tie_word_embeddings=false"), ("--pp", "2")),
    "pp4-1f1b": (4, FOUR_LAYERS, ("--pp", "4")),
    "pp4-interleaved": (4, EIGHT_LAYERS, ("--pp", "4", *INTERLEAVED, "--pp-microbatches", "4")),
    "pp2xdp2-goldfish": (4, (*FOUR_LAYERS, *GOLDFISH), ("--pp", "2", "--set", "batch_size=4")),
    "pp2xtp2": (4, FOUR_LAYERS, ("--pp", "2", "--tp", "2", "--dp-shard", "1")),
    "pp2xtp2xdp2": (8, FOUR_LAYERS, ("--pp", "2", "--tp", "2", "--dp-shard", "2", "--set", "batch_size=4")),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_pipeline_layouts_match_single_process(data_dir, single_run, tmp_path, layout):
    nproc, shared, flags = layout
    reference = single_run
    if shared != FOUR_LAYERS:  # its own reference: Goldfish, or 8 layers for 8 stages
        reference = tmp_path / "single"
        ok(train(1, data_dir, reference, *shared, "--set", "batch_size=8"))
    ok(train(nproc, data_dir, tmp_path / "run", *shared, "--set", "batch_size=8", *flags))
    assert_close(losses(tmp_path / "run"), losses(reference))
    assert_close(val_losses(tmp_path / "run"), val_losses(reference))


@pytest.fixture(scope="module")
def pp2_tp2_run(data_dir, tmp_path_factory):
    """PP 2 x TP 2 (4 processes), 20 steps, a checkpoint at step 10."""
    out = tmp_path_factory.mktemp("pp2tp2")
    flags = ("--pp", "2", "--tp", "2", "--dp-shard", "1", "--set", "batch_size=8", *CHECKPOINTS)
    ok(train(4, data_dir, out, *FOUR_LAYERS, *flags, max_steps=STEPS))
    return out


RESUME_LAYOUTS = {
    "pp1-tp1": (1, "--set", "batch_size=8"),
    "pp4": (4, "--pp", "4", "--set", "batch_size=8"),
    "dp2": (2, "--set", "batch_size=4"),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", RESUME_LAYOUTS.values(), ids=RESUME_LAYOUTS.keys())
def test_pp2_tp2_checkpoint_resumes_under_other_layouts(
    data_dir, single_run_20, pp2_tp2_run, tmp_path, layout
):
    nproc, *flags = layout
    name = checkpoint.checkpoint_name(10)
    shutil.copytree(pp2_tp2_run / "checkpoints" / name, tmp_path / "checkpoints" / name)
    ok(train(nproc, data_dir, tmp_path, *FOUR_LAYERS, "--resume", *flags, max_steps=STEPS))
    resumed = losses(tmp_path)
    assert sorted(resumed) == list(range(11, STEPS + 1))
    assert_close(resumed, losses(pp2_tp2_run))
    assert_close(resumed, losses(single_run_20))


@pytest.mark.slow
def test_killed_stage_restarts_bit_identically(data_dir, tmp_path):
    flags = (*FOUR_LAYERS, "--pp", "2", "--set", "batch_size=8", *CHECKPOINTS)
    ok(train(2, data_dir, tmp_path / "clean", *flags, max_steps=STEPS))
    env = {faults.CRASH_AFTER_STEP: "13", faults.FAULT_RANK: "1"}  # rank 1 runs the last stage
    result = ok(train(2, data_dir, tmp_path / "killed", *flags, max_steps=STEPS, max_restarts=1, env=env))
    step_10 = tmp_path / "killed" / "checkpoints" / "step-00000010"
    assert f"resuming from {step_10}" in result.stderr.replace("\n", "")
    assert losses(tmp_path / "killed")[STEPS] == losses(tmp_path / "clean")[STEPS]


def _config(**changes):
    config = get_recipe("tiny")(data_dir="unused")
    return config.override([f"{key}={value}" for key, value in changes.items()])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"pp": 2, "pp_microbatches": 1}, "1f1b needs at least pp=2 micro-batches"),
        ({"pp": 4}, "4 pipeline stages (pp x pp_virtual_stages) need at least 4 layers"),
        ({"pp": 2, "pp_schedule": "zigzag"}, "pp_schedule must be one of"),
        ({"pp": 2, "pp_schedule": "interleaved-1f1b"}, "interleaved-1f1b runs several stages per rank"),
        ({"pp": 2, "pp_microbatches": 3}, "must split evenly into pp_microbatches=3"),
        ({"pp_virtual_stages": 2}, "need --pp > 1"),
        ({"pp": 2, "pp_stage_layers": "2,1"}, "summing to num_layers=2"),
    ],
)
def test_bad_pipeline_settings_are_one_line_errors(changes, message):
    with pytest.raises(KilnError, match=re.escape(message)) as error:
        _config(**changes)
    assert "\n" not in str(error.value)


def test_pp_must_divide_the_world():
    from kiln.train.layout import ParallelLayout

    with pytest.raises(KilnError, match="needs 4 processes but 6 are running"):
        ParallelLayout.resolve(6, pp=4, dp_shard=1)
    assert ParallelLayout.resolve(8, pp=2, tp=2).dp_shard == 2


def test_stages_balance_parameters_with_embeddings_first_and_head_last():
    # 8 equal layers of cost 10 and an embedding / head of cost 25 each: the end stages get fewer layers.
    assert _balanced_counts([10] * 8, 25, 25, 2) == [4, 4]
    assert _balanced_counts([10] * 8, 25, 0, 2) == [3, 5]
    assert _balanced_counts([10] * 10, 30, 30, 4) == [1, 4, 4, 1]
    config = ModelConfig(vocab_size=32000, hidden_size=64, num_layers=8, num_heads=4, intermediate_size=128)
    counts = stage_layer_counts(config, 4)
    assert sum(counts) == 8 and counts[0] == counts[-1] == 1  # a 2M-parameter embedding outweighs blocks
    assert stage_layer_counts(config, 2, "3,5") == [3, 5]
