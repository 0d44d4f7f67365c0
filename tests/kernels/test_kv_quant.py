"""Quantized KV rows (kiln/kernels/kv_quant.py) and the attention ops that read them in place: the C++ CPU
op and the Triton decode kernel against dequantize-then-reference, on odd shapes (head dims 8, 40, 72 and
128, MQA/GQA/MHA, block sizes 1, 16 and 32, contexts 1, 15, 17 and 1000 with shuffled block tables, mixed
decode and prefill-chunk batches, ALiBi and sliding windows).

Tolerance: max |error| <= 1e-5 x max(1, max |expected|) in fp32; the reference computes in float64 (C++)
or fp32 (Triton) over the very values the kernels dequantize, so quantization error does not enter.
"""

import pytest
import torch

from kiln.errors import KilnError
from kiln.kernels.cpu_extension import cpu_ops_available
from kiln.kernels.kv_quant import dequantize_kv, kv_cache_bits, quantize_kv, split_params
from kiln.models.layers import alibi_slopes

needs_cpu_ops = pytest.mark.skipif(not cpu_ops_available(), reason="kiln's C++ CPU ops are not built here")


def assert_close(got, expected, tolerance=1e-5):
    scale = max(1.0, expected.float().abs().max().item())
    error = (got.float() - expected.float()).abs().max().item()
    assert error <= tolerance * scale, f"error {error:.3g} > {tolerance:g} x {scale:.3g}"


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shift", [0.0, 3.0, -40.0])
def test_round_trip_error_is_at_most_one_step(bits, shift):
    x = torch.randn(50, 3, 40, generator=torch.Generator().manual_seed(bits)) * 2 + shift
    x[0, 0] = 0.25  # a constant row
    codes, params = quantize_kv(x, bits)
    assert codes.dtype == params.dtype == torch.uint8
    assert codes.shape == (50, 3, 40 if bits == 8 else 20) and params.shape == (50, 3, 3)
    scale, zero = split_params(params)
    assert int(zero.max()) <= 2**bits - 1
    error = (dequantize_kv(codes, params, bits, torch.float32) - x).abs()
    # s / 2 by rounding; up to s where the fp16-rounded scale makes an end code clamp
    assert (error <= scale[..., None] * 0.51 + 1e-6).float().mean() > 0.99
    assert (error <= scale[..., None] * 1.01 + 1e-6).all()
    # the range is widened to hold 0, so a row of all-positive values keeps ~(levels) steps over [0, max]
    assert torch.allclose(
        scale, (x.amax(-1).clamp(min=0) - x.amin(-1).clamp(max=0)) / (2**bits - 1), rtol=2e-3
    )


def test_int4_packs_value_d_and_d_plus_half_into_byte_d():
    x = torch.tensor([[0.0, 1, 2, 3, 12, 13, 14, 15]])
    codes, params = quantize_kv(x, 4)
    assert split_params(params)[0].item() == 1.0 and split_params(params)[1].item() == 0
    assert codes.tolist() == [[0 | 12 << 4, 1 | 13 << 4, 2 | 14 << 4, 3 | 15 << 4]]


def test_bad_kv_cache_dtypes_are_refused_in_one_line():
    assert kv_cache_bits(None) == kv_cache_bits("auto") == 0
    assert kv_cache_bits("int8", 33) == 8 and kv_cache_bits("int4", 40) == 4
    with pytest.raises(KilnError, match="unknown kv_cache_dtype 'fp8'; use int8, int4 or auto") as error:
        kv_cache_bits("fp8")
    assert "\n" not in str(error.value)
    with pytest.raises(KilnError, match="needs an even head_dim.*use kv_cache_dtype='int8'") as error:
        kv_cache_bits("int4", 33)
    assert "\n" not in str(error.value)


def _pool(context_lens, kv_heads, head_dim, block_size, bits, generator):
    """A quantized pool (codes, params of keys and values) with shuffled block tables for the contexts."""
    counts = [-(-length // block_size) for length in context_lens]
    num_blocks = sum(counts) + 3
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables, used = [], 0
    for count in counts:
        tables.append(order[used : used + count] + [0] * (max(counts) - count))
        used += count
    shape = (num_blocks * block_size, kv_heads, head_dim)
    keys = torch.randn(shape, generator=generator) * 1.5 + 0.3
    values = torch.randn(shape, generator=generator)
    (key_codes, key_params), (value_codes, value_params) = quantize_kv(keys, bits), quantize_kv(values, bits)
    return key_codes, value_codes, key_params, value_params, torch.tensor(tables, dtype=torch.int32)


# (query_lens, context_lens, heads, kv_heads, head_dim, block_size)
SHAPES = [
    ([1], [1], 1, 1, 8, 1),
    ([1, 1, 4, 15], [1000, 17, 16, 15], 4, 1, 40, 16),
    ([1, 9, 1], [16, 17, 1000], 8, 2, 72, 32),
    ([1, 1, 13], [17, 15, 1000], 12, 3, 8, 1),
    ([1, 40, 1], [33, 1000, 16], 6, 6, 128, 32),
    ([1], [1000], 10, 5, 72, 16),
    # decodes the two-pass walk over codes takes (head dim a multiple of 16, int4: of 32)
    ([1], [1000], 8, 2, 64, 16),  # batch 1: split along the context across threads, GQA 4
    ([1, 1, 1], [2000, 33, 1], 6, 2, 32, 16),  # the demo model's shape (GQA 3, head dim 32)
    ([1, 1], [700, 90], 12, 12, 64, 16),  # MHA at the 134M model's head size
]


@needs_cpu_ops
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("variant", ["plain", "alibi", "window"])
@pytest.mark.parametrize("decode_pass", ["two-pass", "tiles"])
def test_cpu_op_equals_dequantize_then_reference(shape, bits, variant, decode_pass, monkeypatch):
    # Decodes take the two-pass walk over the codes where it supports the head dim unless KILN_PA_DECODE=0
    # sends them through the key-tile loop (which dequantizes each tile); both must match the reference.
    monkeypatch.setenv("KILN_PA_DECODE", "1" if decode_pass == "two-pass" else "0")
    from kiln.kernels.cpu_paged_attention import (
        paged_attention_quantized,
        paged_attention_quantized_reference,
    )

    query_lens, context_lens, heads, kv_heads, head_dim, block_size = shape
    generator = torch.Generator().manual_seed(len(query_lens) + bits)
    *pool, tables = _pool(context_lens, kv_heads, head_dim, block_size, bits, generator)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=generator)
    starts = [sum(query_lens[:i]) for i in range(len(query_lens))]
    metadata = [torch.tensor(x, dtype=torch.int32) for x in (starts, query_lens, context_lens)]
    options = {"alibi": dict(alibi_slopes=alibi_slopes(heads)), "window": dict(sliding_window=7)}.get(
        variant, {}
    )
    args = (q, *pool, bits, tables, *metadata, block_size)
    got = paged_attention_quantized(*args, **options)
    assert got.dtype == torch.float32
    assert_close(got, paged_attention_quantized_reference(*args, **options))


@needs_cpu_ops
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_op_with_a_16_bit_query(dtype):
    from kiln.kernels.cpu_paged_attention import (
        paged_attention_quantized,
        paged_attention_quantized_reference,
    )

    generator = torch.Generator().manual_seed(3)
    *pool, tables = _pool([300, 20], 2, 40, 16, 4, generator)
    q = torch.randn(2, 8, 40, generator=generator).to(dtype)
    metadata = [torch.tensor(x, dtype=torch.int32) for x in ([0, 1], [1, 1], [300, 20])]
    got = paged_attention_quantized(q, *pool, 4, tables, *metadata, 16)
    assert got.dtype == dtype
    assert_close(got, paged_attention_quantized_reference(q, *pool, 4, tables, *metadata, 16), 2e-2)
    *pool, tables = _pool([300, 20], 2, 64, 16, 8, generator)  # the two-pass walk over int8 codes
    q = torch.randn(2, 8, 64, generator=generator).to(dtype)
    got = paged_attention_quantized(q, *pool, 8, tables, *metadata, 16)
    assert got.dtype == dtype
    assert_close(got, paged_attention_quantized_reference(q, *pool, 8, tables, *metadata, 16), 2e-2)


@needs_cpu_ops
def test_cpu_op_refuses_codes_that_do_not_match_the_head_dim():
    from kiln.kernels.cpu_paged_attention import paged_attention_quantized

    generator = torch.Generator().manual_seed(0)
    key_codes, value_codes, key_params, value_params, tables = _pool([5], 1, 16, 4, 8, generator)
    metadata = [torch.tensor(x, dtype=torch.int32) for x in ([0], [1], [5])]
    q = torch.randn(1, 2, 16)
    with pytest.raises(RuntimeError, match="codes must be contiguous uint8"):
        paged_attention_quantized(
            q, key_codes, value_codes, key_params, value_params, 4, tables, *metadata, 4
        )


# (context_lens, heads, kv_heads, head_dim, page_size, num_splits)
TRITON_CASES = [
    ([1, 17, 100], 1, 1, 16, 16, 1),
    ([17, 5], 3, 3, 40, 4, 1),
    ([100, 1, 64], 12, 3, 72, 16, 3),
    ([33, 9], 8, 1, 8, 1, 1),
    ([300], 4, 2, 128, 16, 4),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
@pytest.mark.parametrize("bits", [8, 4])
def test_triton_kernel_equals_dequantize_then_reference(case, bits):
    pytest.importorskip("triton")
    from kiln.kernels.paged_attention_quantized import (
        paged_decode_attention_quantized,
        paged_decode_quantized_reference,
    )
    from tests.kernels.helpers import DEVICE

    lengths, heads, kv_heads, head_dim, page_size, splits = case
    generator = torch.Generator().manual_seed(bits)
    pool = _pool(lengths, kv_heads, head_dim, page_size, bits, generator)
    *pool, tables = (t.to(DEVICE) for t in pool)
    q = torch.randn(len(lengths), heads, head_dim, generator=generator).to(DEVICE)
    context = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    for options in ({}, dict(alibi_slopes=alibi_slopes(heads).to(DEVICE)), dict(sliding_window=6)):
        got = paged_decode_attention_quantized(
            q, *pool, bits, tables, context, page_size, max(lengths), num_splits=splits, **options
        )
        expected = paged_decode_quantized_reference(q, *pool, bits, tables, context, page_size, **options)
        assert_close(got, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", [8, 4])
def test_triton_kernel_full_size_on_gpu(dtype, bits):
    """The 16-bit dot path (tensor cores; the interpreter always computes in fp32) at a 7B-like shape."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from kiln.kernels.paged_attention_quantized import (
        paged_decode_attention_quantized,
        paged_decode_quantized_reference,
    )

    lengths = [1, 17, 1000, 4096, 16384, 333]
    generator = torch.Generator().manual_seed(0)
    *pool, tables = (t.cuda() for t in _pool(lengths, 8, 128, 16, bits, generator))
    q = torch.randn(len(lengths), 32, 128, generator=generator).cuda().to(dtype)
    context = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    got = paged_decode_attention_quantized(q, *pool, bits, tables, context, 16, max(lengths))
    expected = paged_decode_quantized_reference(q.float(), *pool, bits, tables, context, 16)
    assert got.dtype == dtype
    assert_close(got, expected, 2e-2)
