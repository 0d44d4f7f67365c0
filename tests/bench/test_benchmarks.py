"""`kiln bench train` runs end to end (a smoke test: timings are checked only against the call's own wall
time; what is asserted is that both sides train the same model on the same batch alike)."""

import json
import math
import time

import pytest

import kiln
from kiln.bench.results import write_result
from kiln.bench.train import bench_train


def test_bench_train_smoke(tmp_path):
    model = kiln.preset("tiny", tie_word_embeddings=True)
    start = time.perf_counter()
    result = bench_train(model, batch_size=2, seq_len=16, steps=2, warmup=1, name="tiny")
    wall_ms = 1000 * (time.perf_counter() - start)
    # Same weights, same batch, same optimizer settings: both sides learn the batch (from ln V at the
    # initialisation) and their losses after 3 steps agree.
    assert result.kiln_final_loss < math.log(model.vocab_size) - 0.1
    assert result.kiln_final_loss == pytest.approx(result.peer_final_loss, rel=1e-3)
    # The step times are medians of real steps: one kiln and one peer step at least fit the call's time.
    assert 0 < result.kiln_step_ms and 0 < result.peer_step_ms
    assert result.kiln_step_ms + result.peer_step_ms < wall_ms
    saved = json.loads(write_result(result, tmp_path / "train.json").read_text())
    assert saved["precision"] == saved["peer_precision"] == "fp32"


def test_bench_generate_smoke():
    from kiln.bench.generate import bench_generate

    result = bench_generate(
        kiln.preset("tiny"), name="tiny", num_prompts=3, min_prompt=2, max_prompt=9, new_tokens=5, repeats=1
    )
    assert result.identical_to_peer == 3  # same weights, greedy: kiln.LLM equals transformers generate
    assert result.kiln_tokens_per_second > 0 and result.peer_tokens_per_second > 0


def test_bench_moe_shape_against_mixtral():
    from kiln.bench.generate import bench_generate
    from kiln.bench.train import MOE_SHAPE

    model = kiln.preset("tiny", **MOE_SHAPE)
    result = bench_train(model, batch_size=2, seq_len=16, steps=2, warmup=1, name="tiny-moe")
    # both sides add their load-balancing loss (per sequence in kiln, per batch in Mixtral): close, not equal
    assert result.kiln_final_loss == pytest.approx(result.peer_final_loss, rel=1e-2)
    generated = bench_generate(
        model, name="tiny-moe", num_prompts=3, min_prompt=2, max_prompt=9, new_tokens=5
    )
    assert generated.identical_to_peer == 3
