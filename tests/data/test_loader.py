import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.data.loader import TokenLoader
from kiln.errors import KilnError

# Token values encode (shard, position) so a test can tell where every token came from.
SHARD_LENGTHS = (1000, 300, 17)


def write_split(directory: Path) -> Path:
    shards = []
    for index, length in enumerate(SHARD_LENGTHS):
        name = f"train_{index:05d}.npy"
        np.save(directory / name, (np.arange(length) + 10_000 * index).astype(np.uint16))
        shards.append({"path": name, "num_tokens": length, "num_documents": 1})
    manifest = {"splits": {"train": {"shards": shards}, "val": {"shards": []}}, "dtype": "uint16"}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


@pytest.fixture
def data_dir(tmp_path):
    return write_split(tmp_path)


def make(data_dir, **overrides):
    return TokenLoader(data_dir, **({"seq_len": 32, "batch_size": 8, "seed": 1234} | overrides))


def test_batches_are_shifted_windows_within_one_shard(data_dir):
    loader = make(data_dir)
    for step in range(50):
        inputs, targets = loader.batch(step)
        assert inputs.shape == targets.shape == (8, 32) and inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(targets[:, :-1], inputs[:, 1:])
        # Consecutive values throughout: the window never crossed into another shard (offset by 10000).
        assert torch.all(targets - inputs == 1)
        assert torch.all(inputs[:, 0] // 10_000 < 2)  # shard 2 (17 tokens) cannot hold 33


def test_same_seed_step_rank_gives_identical_batches(data_dir):
    first, second = make(data_dir, rank=1, world_size=2), make(data_dir, rank=1, world_size=2)
    for step in (0, 1, 7, 123456):
        for a, b in zip(first.batch(step), second.batch(step), strict=True):
            assert torch.equal(a, b)
    assert not torch.equal(first.batch(0)[0], first.batch(1)[0])
    assert not torch.equal(first.batch(0)[0], make(data_dir, seed=1235).batch(0)[0])


def test_identical_across_processes(data_dir):
    code = (
        "import sys; from kiln.data.loader import TokenLoader;"
        "loader = TokenLoader(sys.argv[1], seq_len=32, batch_size=8, seed=1234, rank=1, world_size=2);"
        "print(loader.batch(5)[0].sum(dim=1).tolist())"
    )
    output = subprocess.run(
        [sys.executable, "-c", code, str(data_dir)], capture_output=True, text=True, check=True
    )
    expected = make(data_dir, rank=1, world_size=2).batch(5)[0].sum(dim=1).tolist()
    assert output.stdout.strip() == str(expected)


def test_ranks_draw_different_windows(data_dir):
    batches = [make(data_dir, rank=rank, world_size=4).batch(3)[0] for rank in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(batches[i], batches[j])


def test_every_start_is_reachable_including_the_last(data_dir):
    loader = make(data_dir, seq_len=999, batch_size=64)  # only shard 0 holds 1000 tokens: one start
    assert torch.all(loader.batch(0)[0][:, 0] == 0)
    loader = make(data_dir, seq_len=290, batch_size=256)
    starts = {int(value) for step in range(20) for value in loader.batch(step)[0][:, 0]}
    assert max(starts) == 10_000 + 300 - 291  # the last start of shard 1
    assert max(s for s in starts if s < 10_000) == 1000 - 291


def test_state_dict_resumes_exactly(data_dir):
    uninterrupted = make(data_dir)
    expected = [uninterrupted.next_batch()[0] for _ in range(6)]
    loader = make(data_dir)
    seen = [loader.next_batch()[0] for _ in range(3)]
    state = loader.state_dict()
    assert state["step"] == 3
    resumed = make(data_dir)
    resumed.load_state_dict(state)
    seen += [batch[0] for _, batch in zip(range(3), resumed, strict=False)]
    assert all(torch.equal(a, b) for a, b in zip(seen, expected, strict=True))
    with pytest.raises(KilnError, match="seed"):
        make(data_dir, seed=1).load_state_dict(state)


def test_errors(data_dir):
    with pytest.raises(KilnError, match="lower seq_len"):
        make(data_dir, seq_len=1000)
    with pytest.raises(KilnError, match="rank"):
        make(data_dir, rank=2, world_size=2)
    with pytest.raises(KilnError, match="has no tokens"):
        make(data_dir, split="val")
    with pytest.raises(KilnError, match="choose one of"):
        make(data_dir, split="test")


def test_global_batch_is_independent_of_world_size(data_dir):
    """Rank slices of a step concatenate to the single-process batch of the same global size, so a run
    resharded to another world size sees exactly the same samples."""
    whole = make(data_dir, batch_size=8).batch(4)[0]
    halves = [make(data_dir, batch_size=4, rank=r, world_size=2).batch(4)[0] for r in range(2)]
    quarters = [make(data_dir, batch_size=2, rank=r, world_size=4).batch(4)[0] for r in range(4)]
    assert torch.equal(torch.cat(halves), whole) and torch.equal(torch.cat(quarters), whole)
