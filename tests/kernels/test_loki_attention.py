"""Loki sparse attention (kiln/kernels/loki_attention.py): the dense-sequence reference, the engine's paged
decode in torch, the C++ op and the Triton kernels (in Triton's interpreter) agree; with top_k = 1 every one
is dense causal attention."""

import pytest
import torch
import torch.nn.functional as F

from kiln.errors import KilnError
from kiln.kernels.cpu_extension import cpu_ops_available
from kiln.kernels.cpu_paged_attention import paged_attention_reference
from kiln.kernels.kv_quant import dequantize_kv, quantize_kv
from kiln.kernels.loki_attention import loki_attention_reference, loki_decode_attention, num_selected
from kiln.kernels.runtime import triton_available

needs_cpp = pytest.mark.skipif(not cpu_ops_available(), reason="kiln's C++ CPU ops are not built here")
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def _paged(k: torch.Tensor, v: torch.Tensor, block_size: int, seed: int = 0):
    """Scatter (B, KVH, T, D) keys/values into a pool in shuffled blocks: (pool keys, values, tables)."""
    batch, num_kv_heads, length, head_dim = k.shape
    blocks_per_seq = -(-length // block_size)
    order = torch.randperm(batch * blocks_per_seq + 3, generator=torch.Generator().manual_seed(seed))
    tables = order[: batch * blocks_per_seq].view(batch, blocks_per_seq).int()
    num_slots = (batch * blocks_per_seq + 3) * block_size
    keys = torch.randn(num_slots, num_kv_heads, head_dim, dtype=k.dtype)  # garbage outside the sequences
    values = torch.randn(num_slots, num_kv_heads, head_dim, dtype=k.dtype)
    positions = torch.arange(length)
    for seq in range(batch):
        slots = tables[seq].long()[positions // block_size] * block_size + positions % block_size
        keys[slots] = k[seq].transpose(0, 1)
        values[slots] = v[seq].transpose(0, 1)
    return keys, values, tables


def _inputs(batch=2, heads=6, kv_heads=2, length=37, head_dim=24, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, head_dim, generator=generator).to(dtype)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=generator).to(dtype)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=generator).to(dtype)
    return q, k, v


def test_reference_at_top_k_one_is_dense_causal_attention():
    q, k, v = _inputs()
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(loki_attention_reference(q, k, v, rank=6, top_k=1.0), dense, atol=1e-6, rtol=0)


def test_reference_keeps_ceil_top_k_keys_per_query():
    q, k, v = _inputs(batch=1, heads=2, kv_heads=2)
    # values one-hot per key position: the output's support is the set of keys attended
    length = k.shape[2]
    v = torch.eye(length)[None, None].expand(1, 2, length, length)
    q = F.pad(q, (0, length - q.shape[-1]))
    k = F.pad(k, (0, length - k.shape[-1]))
    out = loki_attention_reference(q, k, v, rank=4, top_k=0.25)
    attended = (out[0] > 0).sum(-1)  # (H, T)
    expected = torch.tensor([num_selected(t + 1, 0.25) for t in range(length)])
    assert torch.equal(attended, expected.expand(2, length))
    assert num_selected(8, 0.25) == 2 and num_selected(9, 0.25) == 3 and num_selected(1, 0.25) == 1


@pytest.mark.parametrize("use_cpp", [False, pytest.param(True, marks=needs_cpp)])
@pytest.mark.parametrize("top_k", [0.25, 0.6, 1.0])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "length", "block_size"),
    [(6, 2, 24, 37, 16), (4, 4, 32, 50, 4), (8, 1, 16, 9, 8)],
)
def test_paged_decode_matches_the_reference_last_query(
    use_cpp, top_k, heads, kv_heads, head_dim, length, block_size
):
    q, k, v = _inputs(heads=heads, kv_heads=kv_heads, length=length, head_dim=head_dim)
    rank = max(1, head_dim // 4)
    expected = loki_attention_reference(q, k, v, rank, top_k)[:, :, -1]  # (B, H, D)
    keys, values, tables = _paged(k, v, block_size)
    lens = torch.full((q.shape[0],), length, dtype=torch.int32)
    out = loki_decode_attention(
        q[:, :, -1], keys, values, tables, lens, block_size, rank, top_k, use_cpp=use_cpp
    )
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("use_cpp", [False, pytest.param(True, marks=needs_cpp)])
def test_paged_decode_at_top_k_one_equals_dense_paged_attention(use_cpp):
    q, k, v = _inputs(length=45)
    keys, values, tables = _paged(k, v, block_size=16)
    lens = torch.tensor([45, 30], dtype=torch.int32)  # the second sequence sees only its first 30 keys
    queries = torch.stack([q[0, :, 44], q[1, :, 29]])  # (M, H, D)
    out = loki_decode_attention(queries, keys, values, tables, lens, 16, rank=6, top_k=1.0, use_cpp=use_cpp)
    starts, ones = torch.tensor([0, 1], dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    dense = paged_attention_reference(queries, keys, values, tables, starts, ones, lens, 16)
    torch.testing.assert_close(out, dense, atol=1e-6, rtol=0)


@needs_cpp
def test_cpp_op_bf16_and_sliding_window_match_torch():
    q, k, v = _inputs(length=64, dtype=torch.bfloat16)
    keys, values, tables = _paged(k, v, block_size=16)
    lens = torch.tensor([64, 40], dtype=torch.int32)
    queries = torch.stack([q[0, :, 63], q[1, :, 39]])
    for window in (None, 20):
        args = (queries, keys, values, tables, lens, 16, 6, 0.25, None, window)
        cpp = loki_decode_attention(*args, use_cpp=True)
        torch_out = loki_decode_attention(*args, use_cpp=False)
        torch.testing.assert_close(cpp.float(), torch_out.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "length", "rank"),
    [(6, 2, 24, 300, 6), (4, 4, 32, 700, 20), (18, 1, 16, 260, 8)],  # rank 20 > D / 2: high nibbles scored
)
def test_decode_over_a_quantized_pool_is_decode_over_its_dequantized_rows(
    bits, dtype, heads, kv_heads, head_dim, length, rank
):
    """The C++ op and the torch code over an int8/int4 pool's codes equal the torch code over the same pool
    dequantized (what the rows hold), with a window and at top_k 1 (dense attention over those rows)."""
    q, k, v = _inputs(heads=heads, kv_heads=kv_heads, head_dim=head_dim, length=length, dtype=dtype)
    keys, values, tables = _paged(k, v, block_size=16)
    (key_codes, key_params), (value_codes, value_params) = quantize_kv(keys, bits), quantize_kv(values, bits)
    rows = [
        dequantize_kv(c, p, bits, torch.float32)
        for c, p in ((key_codes, key_params), (value_codes, value_params))
    ]
    lens = torch.tensor([length, length // 2 + 3], dtype=torch.int32)
    queries = torch.stack([q[0, :, length - 1], q[1, :, length // 2 + 2]])  # (M, H, D)
    tolerance = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    quantized = dict(key_params=key_params, value_params=value_params, bits=bits)
    for top_k, window in ((0.25, None), (0.1, 50), (1.0, None)):
        args = (tables, lens, 16, rank, top_k, None, window)
        expected = loki_decode_attention(queries.float(), *rows, *args, use_cpp=False)
        paths = [False, True] if cpu_ops_available() else [False]
        for use_cpp in paths:
            out = loki_decode_attention(queries, key_codes, value_codes, *args, use_cpp=use_cpp, **quantized)
            assert out.dtype == dtype
            torch.testing.assert_close(out.float(), expected, **tolerance)
        if top_k == 1.0:
            starts, ones = torch.tensor([0, 1], dtype=torch.int32), torch.ones(2, dtype=torch.int32)
            dense = paged_attention_reference(queries.float(), *rows, tables, starts, ones, lens, 16)
            torch.testing.assert_close(expected, dense, atol=1e-5, rtol=1e-5)


@needs_triton
def test_triton_decode_refuses_a_quantized_pool():
    q, k, v = _inputs(length=40)
    keys, values, tables = _paged(k, v, block_size=16)
    (codes, params), lens = quantize_kv(keys, 8), torch.tensor([40, 20], dtype=torch.int32)
    with pytest.raises(KilnError, match="runs on CPU"):
        loki_decode_attention(
            q[:, :, -1], codes, codes, tables, lens, 16, 6, 0.25, use_triton=True, key_params=params,
            value_params=params, bits=8,
        )  # fmt: skip


@needs_cpp
@pytest.mark.parametrize("top_k", [0.02, 0.25, 0.9])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "length"),
    [(6, 2, 32, 1500), (18, 1, 24, 700), (4, 4, 64, 3000)],  # 18 heads a KV head: past rank_scores' 16
)
def test_cpp_op_long_contexts_match_the_reference(top_k, heads, kv_heads, head_dim, length):
    """Contexts long enough for the vector selection (256+ keys), ranks of 6, 8 and 16 (tails of the 8-wide
    transposes), and more query heads a KV head than the keys-in-lanes scores take."""
    q, k, v = _inputs(batch=1, heads=heads, kv_heads=kv_heads, length=length, head_dim=head_dim, seed=3)
    keys, values, tables = _paged(k, v, block_size=16)
    lens = torch.tensor([length], dtype=torch.int32)
    args = (q[:, :, -1], keys, values, tables, lens, 16, head_dim // 4, top_k)
    # the torch paged decode: checked against loki_attention_reference above
    torch.testing.assert_close(
        loki_decode_attention(*args, use_cpp=True),
        loki_decode_attention(*args, use_cpp=False),
        atol=2e-6,
        rtol=1e-5,
    )


@needs_cpp
def test_cpp_op_breaks_ties_towards_earlier_keys():
    """Small-integer queries and keys: every rank-r score is exact in any summation order and most tie. The
    op keeps ties to the earlier position, as loki_attention_reference's stable sort does, past the vector
    selection's bracket (which cannot split a tie and hands the whole tied band to nth_element)."""
    generator = torch.Generator().manual_seed(5)
    length = 600
    q = torch.randint(-1, 3, (1, 6, length, 24), generator=generator).float()
    k = torch.randint(-1, 2, (1, 2, length, 24), generator=generator).float()
    v = torch.randn(1, 2, length, 24, generator=generator)
    expected = loki_attention_reference(q, k, v, rank=6, top_k=0.25)[:, :, -1]
    keys, values, tables = _paged(k, v, block_size=16)
    lens = torch.tensor([length], dtype=torch.int32)
    out = loki_decode_attention(q[:, :, -1], keys, values, tables, lens, 16, 6, 0.25, use_cpp=True)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


@needs_cpp
def test_cpp_op_long_context_bf16_pool_matches_torch():
    """A bf16 pool through the keys-in-lanes scores and the vector selection (bf16 rows widened on load)."""
    q, k, v = _inputs(batch=1, length=1500, head_dim=32, seed=4, dtype=torch.bfloat16)
    keys, values, tables = _paged(k, v, block_size=16)
    args = (q[:, :, -1], keys, values, tables, torch.tensor([1500], dtype=torch.int32), 16, 8, 0.25)
    cpp, reference = loki_decode_attention(*args, use_cpp=True), loki_decode_attention(*args, use_cpp=False)
    torch.testing.assert_close(cpp.float(), reference.float(), atol=2e-2, rtol=2e-2)


@needs_triton
@pytest.mark.parametrize("top_k", [0.02, 0.25, 1.0])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "length", "block_size"),
    [(6, 2, 24, 37, 16), (4, 4, 32, 300, 4), (8, 1, 16, 9, 8), (18, 1, 64, 700, 16)],
)
def test_triton_decode_matches_the_reference_last_query(top_k, heads, kv_heads, head_dim, length, block_size):
    q, k, v = _inputs(heads=heads, kv_heads=kv_heads, length=length, head_dim=head_dim)
    rank = max(1, head_dim // 4) + 1  # not a power of two: the kernel masks the rank's columns
    expected = loki_attention_reference(q, k, v, rank, top_k)[:, :, -1]
    keys, values, tables = _paged(k, v, block_size)
    lens = torch.full((q.shape[0],), length, dtype=torch.int32)
    out = loki_decode_attention(
        q[:, :, -1], keys, values, tables, lens, block_size, rank, top_k, use_triton=True
    )
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


@needs_triton
def test_triton_decode_at_top_k_one_equals_dense_paged_attention():
    q, k, v = _inputs(length=45)
    keys, values, tables = _paged(k, v, block_size=16)
    lens = torch.tensor([45, 30], dtype=torch.int32)  # different lengths: the scores past 30 are -inf
    queries = torch.stack([q[0, :, 44], q[1, :, 29]])
    starts, ones = torch.tensor([0, 1], dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    dense = paged_attention_reference(queries, keys, values, tables, starts, ones, lens, 16)
    for max_context in (None, 45, 64):  # read back from context_lens, or given (at least the longest)
        out = loki_decode_attention(
            queries,
            keys,
            values,
            tables,
            lens,
            16,
            rank=6,
            top_k=1.0,
            use_triton=True,
            max_context=max_context,
        )
        torch.testing.assert_close(out, dense, atol=1e-6, rtol=0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_decode_sliding_window_and_bf16_match_torch(dtype):
    q, k, v = _inputs(length=200, dtype=dtype)
    keys, values, tables = _paged(k, v, block_size=16)
    lens = torch.tensor([200, 77], dtype=torch.int32)
    queries = torch.stack([q[0, :, 199], q[1, :, 76]])
    tolerance = dict(atol=2e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    for window in (None, 50):
        args = (queries, keys, values, tables, lens, 16, 6, 0.25, None, window)
        triton_out = loki_decode_attention(*args, use_triton=True)
        torch_out = loki_decode_attention(*args, use_cpp=False)
        assert triton_out.dtype == dtype
        torch.testing.assert_close(triton_out.float(), torch_out.float(), **tolerance)


@needs_triton
def test_loki_counts_is_num_selected_of_the_visible_keys_and_the_kernels_take_it():
    from kiln.kernels.loki_attention_triton import loki_counts

    lens = torch.tensor([1, 3, 4, 77, 200, 1000], dtype=torch.int32)
    for top_k in (0.1, 0.25, 1 / 3, 1.0):
        for window in (None, 50):
            visible = [min(n, window) if window else n for n in lens.tolist()]
            counts = loki_counts(lens, top_k, window)
            assert counts.dtype == torch.int32
            assert counts.tolist() == [num_selected(n, top_k) for n in visible]
    q, k, v = _inputs(length=200)
    keys, values, tables = _paged(k, v, block_size=16)
    lens = torch.tensor([200, 77], dtype=torch.int32)
    queries = torch.stack([q[0, :, 199], q[1, :, 76]])
    args = (queries, keys, values, tables, lens, 16, 6, 0.25, None, 50, None, True, 200)
    given = loki_decode_attention(*args, counts=loki_counts(lens, 0.25, 50))
    torch.testing.assert_close(given, loki_decode_attention(*args), atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_decode_full_size_on_gpu(dtype):
    """The Llama-style shape of the Loki paper (32 heads over 8 KV heads of 128, rank 32, top 25%) on CUDA."""
    lengths = [1, 17, 1000, 4096, 16384, 333]
    generator = torch.Generator().manual_seed(0)
    block_size, num_blocks = 16, sum(-(-n // 16) for n in lengths) + 4
    keys = torch.randn(num_blocks * block_size, 8, 128, generator=generator).to("cuda", dtype)
    values = torch.randn(num_blocks * block_size, 8, 128, generator=generator).to("cuda", dtype)
    order = torch.randperm(num_blocks, generator=generator)
    width = max(-(-n // block_size) for n in lengths)
    tables = torch.zeros(len(lengths), width, dtype=torch.int32)
    used = 0
    for seq, n in enumerate(lengths):
        blocks = -(-n // block_size)
        tables[seq, :blocks] = order[used : used + blocks].int()
        used += blocks
    q = torch.randn(len(lengths), 32, 128, generator=generator).to("cuda", dtype)
    lens = torch.tensor(lengths, dtype=torch.int32)
    args = (q, keys, values, tables.cuda(), lens.cuda(), block_size, 32, 0.25)
    out = loki_decode_attention(*args, use_triton=True, max_context=max(lengths))
    expected = loki_decode_attention(*args, use_cpp=False)
    tolerance = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), expected.float(), **tolerance)
