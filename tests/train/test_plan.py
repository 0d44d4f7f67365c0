"""Parallel layouts and `kiln plan`: layout resolution and its errors, and the memory estimate checked
against the peak memory of real runs (one process and under torchrun)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kiln
from kiln.recipes import get_recipe
from kiln.train.config import TrainConfig
from kiln.train.layout import ParallelLayout
from kiln.train.plan import PipelineSettings, format_bytes, plan_memory
from kiln.train.trainer import Trainer
from tests.train.memory_data import MemoryData

FP32_BYTES = 4
WORKER = Path(__file__).with_name("memory_worker.py")
# ~18M parameters, untied: big enough that parameters, optimizer state, activations and buffers all
# stand well above the few MB of noise in a process's resident set.
MODEL = {
    "model.hidden_size": 512,
    "model.num_layers": 4,
    "model.num_heads": 8,
    "model.num_kv_heads": 4,
    "model.head_dim": 64,
    "model.intermediate_size": 1408,
    "model.vocab_size": 8192,
    "model.tie_word_embeddings": False,
    "seq_len": 256,
    "batch_size": 2,
}
LAYOUTS = {
    "single": ({}, 1),
    "fsdp": ({"dp_shard": 2}, 2),
    "tp": ({"tp": 2, "dp_shard": 1}, 2),
    "ddp": ({"dp_replicate": 2, "dp_shard": 1}, 2),
    "fsdp+checkpointing": ({"dp_shard": 2, "activation_checkpointing": True}, 2),
    "pp2-1f1b": ({"pp": 2, "dp_shard": 1}, 2),
    "pp2-gpipe": ({"pp": 2, "dp_shard": 1, "pp_schedule": "gpipe", "pp_microbatches": 2}, 2),
    "pp2+fsdp2": ({"pp": 2, "dp_shard": 2}, 4),
}


def test_layout_resolves_the_shard_degree_from_the_world_size():
    assert ParallelLayout.resolve(8, dp_replicate=2, tp=2).dp_shard == 2
    assert ParallelLayout.resolve(1).describe() == "single process"
    assert ParallelLayout.resolve(2).describe() == "FSDP 2"
    assert ParallelLayout.resolve(2, dp_replicate=2, dp_shard=1).describe() == "DDP 2"
    assert ParallelLayout.resolve(8, dp_replicate=2, dp_shard=2, tp=2).describe() == "HSDP 2x2 + TP 2"
    layout = ParallelLayout.resolve(4, dp_replicate=2, dp_shard=1, tp=2)  # replicas of TP groups: HSDP
    assert layout.uses_fsdp and not layout.uses_ddp and layout.dp_size == 2
    with pytest.raises(kiln.KilnError, match="needs 4 processes but 2 are running; launch with torchrun"):
        ParallelLayout.resolve(2, dp_shard=2, tp=2)
    with pytest.raises(kiln.KilnError, match="needs a multiple of 2 processes but 3 are running"):
        ParallelLayout.resolve(3, tp=2)


def test_tensor_parallel_checks_the_model_divides():
    layout = ParallelLayout(tp=4)
    with pytest.raises(kiln.KilnError, match="tp=4 must divide num_kv_heads=2"):
        layout.check_model(kiln.preset("tiny"), seq_len=64)
    with pytest.raises(kiln.KilnError, match="does not support ALiBi"):
        layout.check_model(kiln.preset("tiny", position="alibi"), seq_len=64)


def test_one_process_asked_for_tensor_parallelism_says_to_use_torchrun(tmp_path):
    config = TrainConfig(model=kiln.preset("tiny"), data_dir="-", out_dir=str(tmp_path), tp=2)
    with pytest.raises(kiln.KilnError, match="needs a multiple of 2 processes but 1 are running"):
        Trainer(config, train_data=MemoryData(None, 32, 4))


def test_plan_cli_prints_the_bytes_per_rank():
    command = [
        sys.executable,
        "-m",
        "kiln.cli",
        "plan",
        "--recipe",
        "tiny",
        "--dp-shard",
        "2",
        "--set",
        "batch_size=4",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # rich wraps lines at 80 columns outside a terminal
    assert all(row in text for row in ("parameters", "gradients", "optimizer state", "activations", "peak"))
    assert "global batch 8 sequences" in text
    model = get_recipe("tiny")().model  # precision "auto" is planned as bf16, what GPUs choose
    plan = plan_memory(model, ParallelLayout(dp_shard=2), seq_len=64, batch_size=4, precision="bf16")
    assert format_bytes(plan.peak) in text


def test_sharding_divides_the_state_and_tensor_parallelism_the_activations():
    model = kiln.preset("small")
    single = plan_memory(model, ParallelLayout(), seq_len=1024, batch_size=8)
    fsdp = plan_memory(model, ParallelLayout(dp_shard=8), seq_len=1024, batch_size=8)
    tp = plan_memory(model, ParallelLayout(tp=4), seq_len=1024, batch_size=8)
    assert fsdp.parameters == single.parameters // 8 and fsdp.optimizer == 2 * fsdp.parameters
    assert fsdp.activations == single.activations
    assert tp.activations < single.activations / 2 and tp.parameters < single.parameters / 3.9
    ddp = plan_memory(model, ParallelLayout(dp_replicate=2), seq_len=1024, batch_size=8)
    assert ddp.peak == single.peak + single.gradients  # DDP's gradient buckets live all the time


def measure(layout: dict, num_processes: int, tmp_path: Path) -> list[int]:
    """Peak resident-set growth of each rank over a few training steps of MODEL under `layout`."""
    prefix = tmp_path / "memory"
    command = [sys.executable, str(WORKER), str(prefix), json.dumps(MODEL | layout)]
    if num_processes > 1:
        torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_processes}"]
        command[1:1] = torchrun
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads(Path(f"{prefix}.rank{rank}").read_text()) for rank in range(num_processes)]
    return [record["rss_peak_delta_bytes"] for record in ranks]


@pytest.mark.parametrize(
    "name",
    [
        "single",
        "fsdp",
        pytest.param("tp", marks=pytest.mark.slow),
        pytest.param("ddp", marks=pytest.mark.slow),
        pytest.param("fsdp+checkpointing", marks=pytest.mark.slow),
        pytest.param("pp2-1f1b", marks=pytest.mark.slow),
        pytest.param("pp2-gpipe", marks=pytest.mark.slow),
        pytest.param("pp2+fsdp2", marks=pytest.mark.slow),
    ],
)
def test_plan_is_within_25_percent_of_the_measured_peak(name, tmp_path, capsys):
    layout, num_processes = LAYOUTS[name]
    config = TrainConfig(model=kiln.preset("tiny"), data_dir="-").override(
        [f"{k}={v}" for k, v in (MODEL | layout).items()]
    )
    parallel = ParallelLayout.resolve(num_processes, **config.layout_args)
    plan = plan_memory(
        config.model,
        parallel,
        seq_len=config.seq_len,
        batch_size=config.batch_size,
        activation_checkpointing=config.activation_checkpointing,
        pipeline=PipelineSettings.of(config),
    )
    measured = max(measure(layout, num_processes, tmp_path))
    with capsys.disabled():
        print(f"\nplan {name}: estimated {format_bytes(plan.peak)}, measured {format_bytes(measured)}")
    assert plan.peak == pytest.approx(measured, rel=0.25)


def test_plan_accounts_for_experts_and_expert_parallelism():
    moe = kiln.preset("demo", num_experts=8, num_experts_per_token=2)
    dense = kiln.preset("demo")
    plans = {
        name: plan_memory(config, layout, seq_len=256, batch_size=4)
        for name, config, layout in [
            ("dense", dense, ParallelLayout(dp_shard=2)),
            ("fsdp", moe, ParallelLayout(dp_shard=2)),
            ("ep", moe, ParallelLayout(dp_shard=2, ep=2)),
            ("ep4", moe, ParallelLayout(dp_shard=4, ep=2)),
        ]
    }
    assert plans["fsdp"].parameters == FP32_BYTES * moe.num_parameters() // 2
    # EP keeps the same share of each weight per rank, but gathers only the rank's own experts
    assert plans["ep"].parameters == plans["fsdp"].parameters
    experts_per_block = 8 * 3 * moe.hidden_size * moe.moe_intermediate_size
    assert plans["fsdp"].buffers - plans["ep"].buffers == FP32_BYTES * 2 * experts_per_block // 2
    assert plans["ep4"].parameters < plans["ep"].parameters
    # top-2 of 8 experts: activations of two MLPs per token, not eight
    assert plans["dense"].activations < plans["fsdp"].activations < 3 * plans["dense"].activations


def test_plan_of_expert_by_tensor_parallelism_splits_attention_not_the_moe_layers():
    moe = kiln.preset("demo", num_experts=8, num_experts_per_token=2, num_shared_experts=1)
    ep = plan_memory(moe, ParallelLayout(dp_shard=2, ep=2), seq_len=256, batch_size=4)
    ep_tp = plan_memory(moe, ParallelLayout(dp_shard=2, ep=2, tp=2), seq_len=256, batch_size=4)
    h, num_layers = moe.hidden_size, moe.num_layers
    attention = h * (moe.num_heads + 2 * moe.num_kv_heads) * moe.head_dim + moe.num_heads * moe.head_dim * h
    embeddings = (1 if moe.tie_word_embeddings else 2) * moe.vocab_size * h  # split by vocabulary
    # tp halves attention and the embeddings; router, shared and routed experts stay whole on each tp rank
    split_by_tp = (num_layers * attention + embeddings) // 2
    assert ep.parameters - ep_tp.parameters == FP32_BYTES * split_by_tp // 2  # then FSDP over dp_shard 2
    # every activation covers the rank's T / tp tokens or heads, except the all-gathered attention input
    assert ep_tp.activations < ep.activations < 2.2 * ep_tp.activations
