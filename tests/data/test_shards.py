import numpy as np
import pytest

from kiln.data.shards import ShardWriter, split_documents, token_dtype


def test_token_dtype_fits_vocabulary():
    assert token_dtype(400) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


@pytest.mark.parametrize("vocab_size", [50_000, 200_000])
def test_shards_round_trip(tmp_path, vocab_size):
    rng = np.random.default_rng(0)
    eos = vocab_size - 1
    documents = [rng.integers(0, eos, size=rng.integers(1, 80)).tolist() for _ in range(40)]
    writer = ShardWriter(
        tmp_path, "train", dtype=token_dtype(vocab_size), eos_token_id=eos, shard_size_tokens=300
    )
    committed = [writer.add(document) for document in documents]
    writer.finish()

    assert sum(committed) == len(writer.shards) - 1  # every shard but the last filled up
    assert all(shard["num_tokens"] >= 300 for shard in writer.shards[:-1])
    assert sum(shard["num_documents"] for shard in writer.shards) == len(documents)
    assert not list(tmp_path.glob(".*.tmp"))
    read_back = []
    for shard in writer.shards:
        tokens = np.load(tmp_path / shard["path"], mmap_mode="r")
        assert tokens.dtype == token_dtype(vocab_size)
        assert tokens.size == shard["num_tokens"] and tokens[-1] == eos
        read_back += [document.tolist() for document in split_documents(tokens, eos)]
    assert read_back == documents
    if vocab_size > 65536:
        assert max(max(document) for document in documents) > 65535  # the uint32 case really needs it


def test_resumed_writer_numbers_after_committed_shards(tmp_path):
    first = ShardWriter(tmp_path, "val", dtype=np.uint16, eos_token_id=0, shard_size_tokens=3)
    first.add([1, 2, 3])
    second = ShardWriter(
        tmp_path, "val", dtype=np.uint16, eos_token_id=0, shard_size_tokens=3, shards=first.shards
    )
    second.add([4, 5])
    assert [shard["path"] for shard in second.shards] == ["val_00000.npy", "val_00001.npy"]
    assert np.load(tmp_path / "val_00001.npy").tolist() == [4, 5, 0]
