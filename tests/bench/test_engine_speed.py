"""`kiln bench generate --shape`: the model-size benchmark runs end to end (on the tiny shape) and what it
reports is measured: kiln's greedy outputs equal transformers', and every figure comes from a timing."""

from kiln.bench.engine_speed import bench_engine_speed


def test_engine_speed_bench_on_the_tiny_shape():
    result = bench_engine_speed("tiny", dtypes=("float32",), threads=1, repeats=1, log=lambda _: None)
    (entry,) = result.results
    assert entry.identical_offline == 64  # same greedy tokens as transformers on all 64 requests
    assert result.read_bandwidth_gb_s > 0 and entry.weight_bytes_per_token > 0
    # the roofline's bandwidth is the best of the ways it was read, each of them measured
    for dtype, best in (
        ("float32", result.read_bandwidth_gb_s),
        ("bfloat16", result.read_bandwidth_bf16_gb_s),
    ):
        reads = result.read_bandwidths[dtype]
        assert {"torch.mv", "torch.sum"} <= set(reads) and best == max(reads.values()) > 0
    # batch 1's fractions are taken against the roofline's read timed beside its runs
    assert entry.batch1_read_gb_s > 0
    implied = entry.batch1_kiln.tokens_per_second * entry.weight_bytes_per_token / 1e9
    assert abs(entry.batch1_kiln_roofline_fraction - implied / entry.batch1_read_gb_s) < 1e-9
    assert 0 < entry.batch1_peer_roofline_fraction
    for side in (entry.batch1_kiln, entry.batch1_peer, entry.offline_kiln, entry.offline_peer):
        assert side.seconds > 0 and side.tokens_per_second > 0
    json = result.to_json()["results"][0]
    assert (
        json["offline_ratio"] == entry.offline_kiln.tokens_per_second / entry.offline_peer.tokens_per_second
    )
