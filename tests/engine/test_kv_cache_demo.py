"""The quantized KV cache on the trained demo model (`kiln demo` trains it into ~/.cache/kiln/models/demo;
skipped when it or its data is absent). Slow: about 5 minutes on a shared 2-core machine.

Bounds (kiln.bench.kv_cache.demo_quality, fp32 weights, 64 prompts x 64 greedy tokens, 32 x 256 validation
tokens): of the 64 x 64 = 4,096 greedy tokens, >= 95% identical to the model-dtype cache's at the same index
(issue 14: "identical ... for >= 95% of 64 prompts x 64 tokens"), and the logprob of every token of the
model-dtype continuation (teacher-forced, 6,080 positions) within 0.05 nats; int4 validation perplexity within
3% (measured 0.9997x). Whole continuations identical (one flipped near-tie anywhere fails a prompt) are
reported, not bounded: the count depends on the trained weights (the 800-step demo model trained on AMD
EPYCs, validation loss 3.5516: 60/64; one trained on an AMX Xeon, 3.5626: 63/64), while the logprob change
stayed under 0.045 nats on both.
"""

from pathlib import Path

import pytest

from kiln.bench.kv_cache import demo_quality
from kiln.demo import demo_model_dir
from kiln.paths import cache_root

VAL_SHARD = cache_root() / "data" / "stdlib-bpe8k" / "val_00000.npy"


@pytest.mark.slow
def test_demo_model_with_int8_and_int4_kv_caches():
    model_dir = demo_model_dir()
    if not (Path(model_dir) / "config.json").is_file() or not VAL_SHARD.is_file():
        pytest.skip("no trained demo model here (run `kiln demo` once)")
    figures = demo_quality(model_dir, VAL_SHARD)
    assert figures["model dtype"]["identical"] == 64
    int8, int4 = figures["int8"], figures["int4"]
    assert int8["identical_tokens"] >= 0.95 * 64 * 64, figures
    assert int8["max_logprob_change"] < 0.05, figures
    assert abs(int8["perplexity_vs_model_dtype"] - 1) < 0.01, figures
    assert abs(int4["perplexity_vs_model_dtype"] - 1) < 0.03, figures
