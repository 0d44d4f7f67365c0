"""The quantized KV cache on the trained demo model (`kiln demo` trains it into ~/.cache/kiln/models/demo;
skipped when it or its data is absent). Slow: about 5 minutes on a shared 2-core machine.

Bounds (kiln.bench.kv_cache.demo_quality, fp32 weights, 64 prompts x 64 greedy tokens, 32 x 256 validation
tokens): of the 64 x 64 = 4,096 greedy tokens, >= 95% identical to the model-dtype cache's at the same index
(issue 14: "identical ... for >= 95% of 64 prompts x 64 tokens"); the logprob of each token of the model-dtype
continuation (teacher-forced, 6,080 positions) changed by < 0.01 nats on average and < 0.1 nats at most; int4
validation perplexity within 3% (measured 0.9997x).
The logprob bounds come from four trained demo models (EPYC, AMX Xeon, EMR Xeon, Zen 4): the mean change was
0.0024-0.0027 nats on every one, so 0.01 is ~4x it; the maximum over 6,080 positions is a tail statistic that
moved with the weights, 0.037-0.058, so 0.1 is ~2x the largest seen (the first bound, 0.05, failed on the Zen
4 model at 0.058). Both stay well below int4's figures (mean 0.043, max 0.65 nats), so the test still tells an
int8 cache from a coarser one. Whole continuations identical (one flipped near-tie anywhere fails a prompt)
are reported, not bounded: the count depends on the trained weights (60/64 on the EPYC-trained model, 63/64 on
the AMX Xeon's).
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
    assert int8["mean_logprob_change"] < 0.01, figures
    assert int8["max_logprob_change"] < 0.1, figures
    assert abs(int8["perplexity_vs_model_dtype"] - 1) < 0.01, figures
    assert abs(int4["perplexity_vs_model_dtype"] - 1) < 0.03, figures
