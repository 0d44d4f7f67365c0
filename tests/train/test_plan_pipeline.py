"""`kiln plan` under pipeline parallelism (per-rank memory, in-flight micro-batches, bubble) and
`kiln plan --gpus` layout recommendations. The estimates against measured peaks are in test_plan.py."""

import subprocess
import sys

import pytest

import kiln
from kiln.errors import KilnError
from kiln.train.layout import ParallelLayout
from kiln.train.plan import PipelineSettings, bubble_fraction, in_flight_chunks, plan_memory
from kiln.train.plan_layout import Cluster, recommend_layouts

MODEL = kiln.preset("demo").replace(num_layers=8, tie_word_embeddings=False)


def test_bubble_follows_the_schedules_formula():
    assert bubble_fraction("1f1b", 4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction("gpipe", 4, 12) == pytest.approx(3 / 15)
    assert bubble_fraction("interleaved-1f1b", 4, 4, 2) == pytest.approx(3 / 11)


def test_in_flight_micro_batches_per_schedule():
    assert [in_flight_chunks("1f1b", 4, rank, 8) for rank in range(4)] == [4, 3, 2, 1]
    assert [in_flight_chunks("gpipe", 4, rank, 8) for rank in range(4)] == [8] * 4
    # torch's interleaved warm-up: (V - 1) x micro-batches per round + 2 per hop from the last rank, + 1
    assert [in_flight_chunks("interleaved-1f1b", 2, rank, 4, 2) for rank in range(2)] == [5, 3]


def test_pipeline_ranks_hold_their_stages_and_in_flight_activations():
    single = plan_memory(MODEL, ParallelLayout(), seq_len=256, batch_size=8)
    one_f_one_b = plan_memory(MODEL, ParallelLayout(pp=2), seq_len=256, batch_size=8)
    gpipe = plan_memory(
        MODEL, ParallelLayout(pp=2), seq_len=256, batch_size=8, pipeline=PipelineSettings("gpipe", 8)
    )
    assert len(one_f_one_b.stage_peaks) == 2 and one_f_one_b.peak == max(one_f_one_b.stage_peaks)
    assert one_f_one_b.parameters < 0.75 * single.parameters  # about half the weights per rank
    # 1F1B keeps 2 micro-batches of 4 sequences through 4 layers: half of one process's activations
    assert one_f_one_b.activations == pytest.approx(single.activations / 2, rel=0.05)
    assert (
        gpipe.activations
        > 1.9
        * plan_memory(
            MODEL, ParallelLayout(pp=2), seq_len=256, batch_size=8, pipeline=PipelineSettings("1f1b", 8)
        ).activations
    )
    assert one_f_one_b.bubble_fraction == pytest.approx(1 / 3)


def test_recommendation_fits_memory_and_keeps_tensor_parallelism_in_a_node():
    big = kiln.preset("demo").replace(
        hidden_size=8192,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        intermediate_size=28672,
        vocab_size=32000,
    )  # ~70B parameters
    cluster = Cluster(num_gpus=64, gpus_per_node=8, gpu_memory_bytes=80 * 2**30)
    choices = recommend_layouts(big, cluster, seq_len=2048, global_batch=64)
    assert choices and all(c.plan.peak <= cluster.gpu_memory_bytes for c in choices)
    assert all(c.layout.tp <= 8 and c.layout.world_size == 64 for c in choices)
    assert choices == sorted(choices, key=lambda c: c.step_seconds)
    with pytest.raises(KilnError, match="no layout of 2 GPUs fits"):
        recommend_layouts(big, Cluster(num_gpus=2, gpus_per_node=2), seq_len=2048, global_batch=2)


def test_plan_cli_prints_pipeline_ranks_and_recommendations():
    base = [sys.executable, "-m", "kiln.cli", "plan", "--recipe", "tiny", "--set", "model.num_layers=4"]
    result = subprocess.run([*base, "--pp", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "pipeline ranks' peaks" in text and "1f1b bubble 33.3% of each step" in text
    result = subprocess.run([*base, "--gpus", "8"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fastest first" in " ".join(result.stdout.split())
    bad = subprocess.run([*base, "--pp", "2", "--pp-microbatches", "1"], capture_output=True, text=True)
    assert bad.returncode != 0 and "needs at least pp=2 micro-batches" in " ".join(bad.stderr.split())
