"""BigBird block-sparse attention (kiln/models/bigbird.py, kiln/kernels/block_sparse_attention.py)."""

import pytest
import torch
import torch.nn.functional as F

from kiln.config import preset
from kiln.errors import KilnError
from kiln.kernels.block_sparse_attention import block_sparse_attention, block_sparse_attention_reference
from kiln.models import bigbird
from kiln.models.hf.io import load_model, save_model
from kiln.models.transformer import Transformer


def _config(**overrides):
    values = dict(
        attention_pattern="bigbird", bigbird_block_size=4, bigbird_num_window_blocks=2,
        bigbird_num_global_blocks=1, bigbird_num_random_blocks=1, max_position_embeddings=256,
    )  # fmt: skip
    return preset("tiny", **{**values, **overrides})


def _qkv(length, heads=4, kv_heads=2, head_dim=16, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(2, heads, length, head_dim), (2, kv_heads, length, head_dim), (2, kv_heads, length, head_dim)]
    return [torch.randn(shape, generator=generator).requires_grad_(requires_grad) for shape in shapes]


def test_pattern_lists_window_global_and_seeded_random_blocks():
    config = _config(bigbird_num_window_blocks=2, bigbird_num_global_blocks=1, bigbird_num_random_blocks=2)
    table = bigbird.key_blocks(config, layer_index=0, num_blocks=12)
    for block, row in enumerate(table.tolist()):
        listed = {b for b in row if b >= 0}
        assert {0, block, max(block - 1, 0)} <= listed and max(listed) == block
        assert len(listed) == min(block + 1, 2 + 1 + 2)  # window + global + random, when there are enough
    # fixed per layer and independent of the sequence length; other layers draw other blocks
    assert torch.equal(
        bigbird.key_blocks(config, 0, 7), table[:7, : bigbird.key_blocks(config, 0, 7).shape[1]]
    )
    assert not torch.equal(table, bigbird.key_blocks(config, 1, 12))
    assert torch.equal(table, bigbird.key_blocks(config, 0, 12))


@pytest.mark.parametrize("blocks_per_chunk", [16, 3])
@pytest.mark.parametrize("length", [1, 5, 16, 37])
def test_block_sparse_equals_dense_masked_reference_with_gradients(length, blocks_per_chunk, monkeypatch):
    from kiln.kernels import block_sparse_attention as module

    monkeypatch.setattr(module, "QUERY_BLOCKS_PER_CHUNK", blocks_per_chunk)
    config = _config()
    num_blocks = -(-length // 4)
    q, k, v = _qkv(length, requires_grad=True)
    table = bigbird.key_blocks(config, 0, num_blocks)
    out = block_sparse_attention(q, k, v, table, 4)
    expected = block_sparse_attention_reference(q, k, v, bigbird.block_allowed(config, 0, num_blocks), 4)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_pattern_covering_the_sequence_equals_dense_causal_attention():
    length = 40
    covering = _config(bigbird_num_window_blocks=10, bigbird_num_global_blocks=0, bigbird_num_random_blocks=0)
    by_random = _config(
        bigbird_num_window_blocks=1, bigbird_num_global_blocks=1, bigbird_num_random_blocks=10
    )
    q, k, v = _qkv(length)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for config in (covering, by_random):
        table = bigbird.key_blocks(config, 3, 10)
        torch.testing.assert_close(block_sparse_attention(q, k, v, table, 4), dense, atol=1e-6, rtol=1e-5)
    # the whole model too: a BigBird model whose pattern covers its context is the dense model
    torch.manual_seed(0)
    model = Transformer(covering).eval()
    dense_model = Transformer(covering.replace(attention_pattern="dense")).eval()
    dense_model.load_state_dict(model.state_dict())
    ids = torch.randint(0, covering.vocab_size, (2, length))
    torch.testing.assert_close(model(ids), dense_model(ids), atol=1e-5, rtol=1e-5)


def test_sparse_pattern_differs_from_dense_and_kv_cache_decode_matches_full_forward():
    config = _config()
    torch.manual_seed(0)
    model = Transformer(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 30))
    with torch.no_grad():
        full = model(ids)
        dense = Transformer(config.replace(attention_pattern="dense")).eval()
        dense.load_state_dict(model.state_dict())
        assert not torch.allclose(full, dense(ids), atol=1e-3)
        cache = model.new_kv_cache(2, 30)
        steps = [model(ids[:, :17], kv_cache=cache)]
        steps += [model(ids[:, t : t + 1], kv_cache=cache) for t in range(17, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_config_validation_and_hf_round_trip(tmp_path):
    with pytest.raises(KilnError, match="attention_pattern"):
        preset("tiny", attention_pattern="sparse")
    with pytest.raises(KilnError, match="positive"):
        _config(bigbird_block_size=0)
    config = _config(bigbird_seed=7)
    model = Transformer(config)
    save_model(model, tmp_path / "llama")
    loaded = load_model(tmp_path / "llama")
    assert loaded.config.attention_pattern == "bigbird" and loaded.config.bigbird_seed == 7
    assert loaded.config.bigbird_block_size == 4 and loaded.config.bigbird_num_random_blocks == 1
    for family in ("mistral", "qwen2"):
        with pytest.raises(KilnError, match="cannot express"):
            save_model(model, tmp_path / family, family=family)


def test_engine_refuses_bigbird_models():
    from kiln.engine.engine import Engine

    with pytest.raises(KilnError, match="dense attention only"):
        Engine(Transformer(_config()), None)
