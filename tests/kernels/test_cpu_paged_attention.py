"""The C++ CPU paged-attention op against its float64 torch reference, and the engine backend around it
(CppPagedAttention) against the torch one (TorchPagedAttention), on odd shapes: 1 and 3 KV heads, GQA 4
and 8, contexts 1, 15, 16, 17 and 1000, block sizes 1, 16 and 32, shuffled block tables, mixed decode and
prefill-chunk batches, ALiBi and sliding windows; decodes through both of the op's paths (two passes in token
order, and the key-tile loop; KILN_PA_DECODE=0 selects the latter).

Tolerance: max |error| <= 1e-5 (fp32) or 2e-2 (bf16, fp16) times max(1, max |expected|).
"""

import pytest
import torch

from kiln.kernels.cpu_extension import cpu_ops_available

if not cpu_ops_available():
    pytest.skip(
        "kiln's C++ CPU ops could not be built here (no C++ compiler, OpenMP or ninja)",
        allow_module_level=True,
    )

from kiln.config import ModelConfig  # noqa: E402
from kiln.engine.attention import KVPool, PagedBatch, TorchPagedAttention  # noqa: E402
from kiln.engine.cpu_attention import CppPagedAttention  # noqa: E402
from kiln.kernels.cpu_paged_attention import paged_attention, paged_attention_reference  # noqa: E402
from kiln.models.layers import alibi_slopes  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def assert_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == expected.shape and got.dtype == expected.dtype == dtype
    scale = max(1.0, expected.float().abs().max().item())
    error = (got.float() - expected.float()).abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"error {error:.3g} > {TOLERANCE[dtype]:g} x {scale:.3g}"


def shuffled_tables(context_lens, block_size, generator, spare_blocks=3):
    """Block tables over a pool with blocks in random order (as a busy pool's are), padded with zeros."""
    counts = [-(-length // block_size) for length in context_lens]
    num_blocks = sum(counts) + spare_blocks
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables, used = [], 0
    for count in counts:
        tables.append(order[used : used + count])
        used += count
    return tables, num_blocks


def op_inputs(query_lens, context_lens, heads, kv_heads, head_dim, block_size, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tables, num_blocks = shuffled_tables(context_lens, block_size, generator)
    width = max(len(t) for t in tables)
    padded = [t + [0] * (width - len(t)) for t in tables]
    cache_shape = (num_blocks * block_size, kv_heads, head_dim)
    keys = torch.randn(cache_shape, generator=generator).to(dtype)
    values = torch.randn(cache_shape, generator=generator).to(dtype)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=generator).to(dtype)
    starts = [sum(query_lens[:i]) for i in range(len(query_lens))]
    int32 = dict(dtype=torch.int32)
    metadata = [torch.tensor(x, **int32) for x in (padded, starts, query_lens, context_lens)]
    return (q, keys, values, *metadata, block_size)


# (query_lens, context_lens, heads, kv_heads, head_dim, block_size): decodes, prefill chunks over cached
# context and fresh prompts mixed; head dims with and without a vector tail.
SHAPES = [
    ([1], [1], 1, 1, 16, 1),
    ([1, 1, 1, 1], [15, 16, 17, 1], 3, 3, 64, 16),
    ([1, 1, 4, 15], [1000, 17, 16, 15], 4, 1, 40, 16),
    ([1, 9, 1], [16, 17, 1000], 8, 1, 64, 32),
    ([1, 1, 13], [17, 15, 1000], 12, 3, 8, 1),
    ([1, 40, 1], [33, 1000, 16], 24, 3, 128, 32),
    ([100, 1], [1000, 15], 16, 4, 12, 16),
    ([1], [1000], 10, 5, 64, 16),  # one decode: its kv heads split into uneven ranges across threads
    ([1, 1, 1], [2000, 33, 1], 6, 2, 32, 16),  # decodes of the demo model's shape (GQA 3, head dim 32)
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["plain", "alibi", "window"])
@pytest.mark.parametrize("decode_pass", ["two-pass", "tiles"])
def test_op_matches_reference(shape, dtype, variant, decode_pass, monkeypatch):
    # Decodes take the two-pass path where it supports the head dim (fp32: multiples of 16, bf16: of 32)
    # unless KILN_PA_DECODE=0 sends them through the key-tile loop; both must match the reference.
    monkeypatch.setenv("KILN_PA_DECODE", "1" if decode_pass == "two-pass" else "0")
    inputs = op_inputs(*shape, dtype)
    options = {}
    if variant == "alibi":
        options["alibi_slopes"] = alibi_slopes(shape[2])
    if variant == "window":
        options["sliding_window"] = 7
    got = paged_attention(*inputs, **options)
    assert_close(got, paged_attention_reference(*inputs, **options), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("contexts", [[1000], [33, 1000], [40, 97, 2000, 1], [48, 48, 48]], ids=str)
def test_few_decodes_split_along_their_context(contexts, dtype):
    # Fewer decodes than the threads want (4 items a thread): each is split into parts of whole 16-token
    # tiles, every kv head in a part, and the parts' unnormalised results combined; with ALiBi and a window
    # (the parts start past the window's first key), and contexts that split unevenly or not at all.
    inputs = op_inputs([1] * len(contexts), contexts, 8, 2, 64, 16, dtype)
    for options in ({}, {"alibi_slopes": alibi_slopes(8)}, {"sliding_window": 300}, {"sliding_window": 40}):
        got = paged_attention(*inputs, **options)
        assert_close(got, paged_attention_reference(*inputs, **options), dtype)


def test_fp16_and_a_custom_scale():
    inputs = op_inputs([1, 6, 1], [17, 20, 1000], 6, 3, 40, 16, torch.float16)
    options = dict(scale=0.3, alibi_slopes=alibi_slopes(6), sliding_window=100)
    assert_close(
        paged_attention(*inputs, **options), paged_attention_reference(*inputs, **options), torch.float16
    )


def test_rows_of_no_listed_sequence_are_zero_and_strided_q_is_read():
    q, keys, values, tables, starts, lens, contexts, block_size = op_inputs(
        [2, 1], [5, 9], 4, 2, 16, 4, torch.float32
    )
    wide = torch.randn(5, 8, 16)[:, ::2]  # (N + 2, H, D) with a head stride of 2 * D
    wide[2:] = q
    got = paged_attention(wide, keys, values, tables, starts + 2, lens, contexts, block_size)
    assert got[:2].abs().max() == 0
    expected = paged_attention_reference(q, keys, values, tables, starts, lens, contexts, block_size)
    assert_close(got[2:], expected, torch.float32)


def test_bad_block_tables_are_refused():
    q, keys, values, tables, starts, lens, contexts, block_size = op_inputs(
        [1], [9], 2, 2, 16, 4, torch.float32
    )
    with pytest.raises(RuntimeError, match="outside the pool"):
        paged_attention(q, keys, values, tables + 1000, starts, lens, contexts, block_size)
    with pytest.raises(RuntimeError, match="needs 3 blocks"):
        paged_attention(q, keys, values, tables[:, :2], starts, lens, contexts, block_size)


def backend_step(config, query_lens, context_lens, block_size, dtype, seed=0):
    """A pool of random cached keys/values and a step of new tokens (1, H|KVH, N, D) for it."""
    generator = torch.Generator().manual_seed(seed)
    tables, num_blocks = shuffled_tables(context_lens, block_size, generator)
    pool = KVPool(config, num_blocks, block_size, dtype, torch.device("cpu"))
    pool.keys.copy_(torch.randn(pool.keys.shape, generator=generator))
    pool.values.copy_(torch.randn(pool.values.shape, generator=generator))
    slots = [
        table[p // block_size] * block_size + p % block_size
        for table, n, length in zip(tables, query_lens, context_lens, strict=True)
        for p in range(length - n, length)
    ]
    batch = PagedBatch(
        slot_mapping=torch.tensor(slots),
        query_starts=[sum(query_lens[:i]) for i in range(len(query_lens))],
        query_lens=query_lens,
        context_lens=context_lens,
        block_tables=tables,
    )
    n, d = sum(query_lens), config.head_dim
    q = torch.randn(1, n, config.num_heads, d, generator=generator).to(dtype).transpose(1, 2)
    k, v = (
        torch.randn(1, n, config.num_kv_heads, d, generator=generator).to(dtype).transpose(1, 2) for _ in "kv"
    )
    return pool, batch, q, k, v


BACKEND_CASES = [
    # heads, kv_heads, head_dim, position, window, block_size, query_lens, context_lens
    (4, 1, 16, "rope", None, 1, [1, 1, 17, 16], [1000, 15, 17, 40]),
    (8, 1, 64, "rope", 7, 16, [1, 1, 15, 1], [17, 16, 15, 1]),
    (6, 3, 40, "alibi", None, 32, [1, 1, 9, 20], [1000, 1, 33, 20]),
    (3, 3, 16, "learned", None, 16, [1, 1, 1], [15, 16, 17]),
]


@pytest.mark.parametrize("case", BACKEND_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_matches_the_torch_backend(case, dtype):
    heads, kv_heads, head_dim, position, window, block_size, query_lens, context_lens = case
    if position == "alibi" and dtype == torch.bfloat16:
        # The torch backend rounds its ALiBi bias slope * j to bf16, exact only below j = 256 (8
        # significant bits; these slopes are powers of two): past that it is the less accurate side.
        context_lens = [min(length, 256) for length in context_lens]
    config = ModelConfig(
        vocab_size=10, hidden_size=heads * head_dim, num_layers=2, num_heads=heads, num_kv_heads=kv_heads,
        position=position, sliding_window=window,
    )  # fmt: skip
    outputs, pools = [], []
    for backend in (TorchPagedAttention, CppPagedAttention):
        pool, batch, q, k, v = backend_step(config, query_lens, context_lens, block_size, dtype)
        attention = backend(pool, batch, config)
        outputs.append(torch.stack([attention(layer, q, k, v) for layer in range(config.num_layers)]))
        pools.append(pool)
    assert_close(outputs[1], outputs[0], dtype)
    assert torch.equal(pools[1].keys, pools[0].keys) and torch.equal(pools[1].values, pools[0].values)
