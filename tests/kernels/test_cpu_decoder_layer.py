"""kiln::decoder_layer (one whole decoder layer for a step of decodes, in C++) against its torch reference
(kernels' references composed, attention in float64), on odd shapes: MHA, GQA and MQA, head dims with a
vector tail, biases, no RoPE (ALiBi), a sliding window, block sizes 1 and 16, contexts 1 to 1000, and more
rows than the small-row linear takes (the op then runs at::linear).

Tolerance: max |error| <= 1e-5 (fp32) or 2e-2 (bf16) times max(1, max |expected|); the KV pool the op
writes must equal the reference's.
"""

import pytest
import torch

from kiln.kernels.cpu_extension import cpu_ops_available

if not cpu_ops_available():
    pytest.skip(
        "kiln's C++ CPU ops could not be built here (no C++ compiler, OpenMP or ninja)",
        allow_module_level=True,
    )

from kiln.kernels.cpu_decoder_layer import (  # noqa: E402
    W8A8_BITS,
    LayerStack,
    LayerWeights,
    PagedDecode,
    decoder_layer,
    decoder_layer_reference,
    decoder_layers,
)
from kiln.kernels.packed_weight import pack, packed_rows, packing_available  # noqa: E402
from kiln.models.layers import alibi_slopes  # noqa: E402
from tests.kernels.test_cpu_paged_attention import assert_close, shuffled_tables  # noqa: E402


def random_layer(hidden, heads, kv_heads, head_dim, inner, dtype, biases, generator):
    def tensor(*shape, scale=None):
        scale = scale if scale is not None else shape[-1] ** -0.5
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = [(q,), (kv,), (kv,), (hidden,), (inner,), (inner,), (hidden,)]
    return LayerWeights(
        attn_norm=1 + tensor(hidden, scale=0.1), q=tensor(q, hidden), k=tensor(kv, hidden),
        v=tensor(kv, hidden), o=tensor(hidden, q), mlp_norm=1 + tensor(hidden, scale=0.1),
        gate=tensor(inner, hidden), up=tensor(inner, hidden), down=tensor(hidden, inner),
        biases=tuple(tensor(*s, scale=0.1) for s in shapes) if biases else (None,) * 7, eps=1e-5,
    )  # fmt: skip


def decode_step(context_lens, kv_heads, head_dim, block_size, dtype, generator, **options):
    """A pool of random cached keys/values and one decode per sequence (its last position)."""
    tables, num_blocks = shuffled_tables(context_lens, block_size, generator)
    width = max(len(t) for t in tables)
    cache_shape = (num_blocks * block_size, kv_heads, head_dim)
    keys = torch.randn(cache_shape, generator=generator).to(dtype)
    values = torch.randn(cache_shape, generator=generator).to(dtype)
    slots = [
        t[(n - 1) // block_size] * block_size + (n - 1) % block_size
        for t, n in zip(tables, context_lens, strict=True)
    ]
    int32 = dict(dtype=torch.int32)
    step = PagedDecode(
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], **int32),
        query_starts=torch.arange(len(context_lens), **int32),
        query_lens=torch.ones(len(context_lens), **int32),
        context_lens=torch.tensor(context_lens, **int32),
        block_size=block_size,
        scale=head_dim**-0.5,
        **options,
    )
    return keys, values, step


# (context_lens, hidden, heads, kv_heads, head_dim, inner, block_size)
SHAPES = [
    ([1], 16, 1, 1, 16, 24, 1),
    ([15, 16, 17, 1], 48, 3, 3, 16, 40, 16),
    ([1000, 17], 40, 4, 1, 10, 72, 16),
    ([33, 5, 1000], 96, 8, 2, 12, 100, 1),
    ([7] * 70, 32, 4, 2, 8, 48, 16),  # 70 rows: more than the small-row linear takes in either dtype
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["rope", "rope+biases", "alibi", "rope+window"])
def test_op_matches_reference(shape, dtype, variant):
    context_lens, hidden, heads, kv_heads, head_dim, inner, block_size = shape
    generator = torch.Generator().manual_seed(len(context_lens) * 31 + hidden)
    layer = random_layer(hidden, heads, kv_heads, head_dim, inner, dtype, "biases" in variant, generator)
    options = {}
    if variant == "alibi":
        options["alibi_slopes"] = alibi_slopes(heads)
    if variant == "rope+window":
        options["sliding_window"] = 6
    keys, values, step = decode_step(
        context_lens, kv_heads, head_dim, block_size, dtype, generator, **options
    )
    rows = len(context_lens)
    x = torch.randn(rows, hidden, generator=generator).to(dtype)
    cos = sin = None
    if variant != "alibi":
        angles = torch.rand(rows, head_dim // 2, generator=generator) * 6
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    ref_keys, ref_values = keys.clone(), values.clone()
    expected = decoder_layer_reference(x, layer, cos, sin, ref_keys, ref_values, step)
    max_rows = {torch.float32: 64, torch.bfloat16: 16}[dtype]
    got = decoder_layer(x, layer, cos, sin, keys, values, step, max_rows)
    assert_close(got, expected, dtype)
    written = step.slot_mapping
    assert_close(keys[written], ref_keys[written], dtype)
    assert_close(values[written], ref_values[written], dtype)


@pytest.mark.parametrize("kv_bits", [0, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 20])
def test_layers_in_one_call_equal_the_layers_one_by_one(rows, dtype, kv_bits):
    """kiln::decoder_layers over three layers (float with biases, int4, w8a8 beside float projections; each
    with its own pool, float or quantized) gives decoder_layer's (decoder_layer_quantized's) bits layer after
    layer, and writes the same pool entries."""
    from kiln.kernels.cpu_decoder_layer import decoder_layer_quantized
    from kiln.kernels.kv_quant import quantize_kv
    from kiln.quant import QuantizedLinear, parse_scheme

    generator = torch.Generator().manual_seed(rows)
    hidden, heads, kv_heads, head_dim, inner = 128, 4, 2, 32, 192
    layers = [
        random_layer(hidden, heads, kv_heads, head_dim, inner, dtype, i == 0, generator) for i in range(3)
    ]
    layers[1] = quantize_projections(layers[1], ("int4", 64, False), "qkvogud")
    bits, scales = list(layers[2].bits), list(layers[2].scales)
    for i, name in enumerate(["q", "k", "v", "o", "gate", "up", "down"]):
        if name not in ("o", "up"):
            weight = getattr(layers[2], name).float()
            quantized = QuantizedLinear.from_float(weight, None, parse_scheme("w8a8"))
            setattr(layers[2], name, quantized.qweight)
            bits[i], scales[i] = W8A8_BITS, quantized.scale
    layers[2].bits, layers[2].scales = tuple(bits), tuple(scales)
    contexts = [9] if rows == 1 else [5 + 3 * i for i in range(rows)]
    pools, step = [], None
    for _ in layers:
        keys, values, step = decode_step(
            contexts, kv_heads, head_dim, 16, dtype, torch.Generator().manual_seed(7)
        )
        if kv_bits:
            (key_codes, key_params), (value_codes, value_params) = (
                quantize_kv(keys, kv_bits),
                quantize_kv(values, kv_bits),
            )
            pools.append([key_codes, value_codes, key_params, value_params])
        else:
            pools.append([keys, values])
    angles = torch.rand(rows, head_dim // 2, generator=generator) * 6
    angles = torch.cat((angles, angles), -1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    x = torch.randn(rows, hidden, generator=generator).to(dtype)
    one_by_one, copies = x, [[t.clone() for t in pool] for pool in pools]
    for layer, pool in zip(layers, copies, strict=True):
        if kv_bits:
            one_by_one = decoder_layer_quantized(one_by_one, layer, cos, sin, tuple(pool), kv_bits, step, 16)
        else:
            one_by_one = decoder_layer(one_by_one, layer, cos, sin, *pool, step, 16)
    caches = [t for pool in pools for t in pool]
    got = decoder_layers(x, LayerStack.of(tuple(layers)), cos, sin, caches, kv_bits, step, [16] * 3)
    assert torch.equal(got, one_by_one)
    for pool, reference in zip(pools, copies, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(pool, reference, strict=True))


@pytest.mark.parametrize("kv_bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_pool_rows_are_quantize_kv_of_the_keys(kv_bits, dtype):
    """decoder_layer_quantized writes each new key/value row as kv_quant.quantize_kv would quantize the row
    decoder_layer writes into a float pool (codes and params bit for bit), and leaves other slots alone."""
    from kiln.kernels.cpu_decoder_layer import decoder_layer_quantized
    from kiln.kernels.kv_quant import quantize_kv

    generator = torch.Generator().manual_seed(kv_bits)
    hidden, heads, kv_heads, head_dim, inner = 64, 4, 2, 16, 96
    layer = random_layer(hidden, heads, kv_heads, head_dim, inner, dtype, True, generator)
    contexts = [3, 17, 40, 1, 9]
    keys, values, step = decode_step(contexts, kv_heads, head_dim, 16, dtype, generator)
    x = torch.randn(len(contexts), hidden, generator=generator).to(dtype) * 4
    x[3] = 0  # a row of zeros: its keys/values are the biases alone
    decoder_layer(x, layer, None, None, keys, values, step, 16)
    (key_codes, key_params), (value_codes, value_params) = (
        quantize_kv(keys, kv_bits),
        quantize_kv(values, kv_bits),
    )
    pool = [t.clone() for t in (key_codes, value_codes, key_params, value_params)]
    decoder_layer_quantized(x, layer, None, None, tuple(pool), kv_bits, step, 16)
    for written, expected in zip(pool, (key_codes, value_codes, key_params, value_params), strict=True):
        assert torch.equal(written, expected)


def test_layer_lists_of_the_wrong_length_are_refused():
    generator = torch.Generator().manual_seed(0)
    stack = LayerStack.of(
        tuple(random_layer(16, 2, 2, 8, 24, torch.float32, False, generator) for _ in range(2))
    )
    keys, values, step = decode_step([3], 2, 8, 4, torch.float32, generator)
    x = torch.randn(1, 16)
    with pytest.raises(RuntimeError, match="caches need 2 tensors a layer"):
        decoder_layers(x, stack, None, None, [keys, values, keys], 0, step, [64, 64])
    with pytest.raises(RuntimeError, match="caches need 4 tensors a layer"):
        decoder_layers(x, stack, None, None, [keys, values] * 2, 8, step, [64, 64])
    stack.weights.pop()
    with pytest.raises(RuntimeError, match="9 tensors a layer"):
        decoder_layers(x, stack, None, None, [keys, values] * 2, 0, step, [64, 64])


def test_bad_weight_lists_are_refused():
    generator = torch.Generator().manual_seed(0)
    layer = random_layer(16, 2, 2, 8, 24, torch.float32, False, generator)
    keys, values, step = decode_step([3], 2, 8, 4, torch.float32, generator)
    with pytest.raises(RuntimeError, match="weights must be"):
        torch.ops.kiln.decoder_layer(
            torch.randn(1, 16), layer.weights()[:8], list(layer.biases), 1e-5, None, None, keys, values,
            step.slot_mapping, step.block_tables, step.query_starts, step.query_lens, step.context_lens,
            step.block_size, step.scale, None, 0, 64, [None] * 7, [None] * 7, [0] * 7, [None] * 7, 0,
        )  # fmt: skip


def quantize_projections(layer: LayerWeights, scheme, which: str) -> LayerWeights:
    """`layer` with the projections named in `which` (of "qkvogud") replaced by their weight-only
    quantization under `scheme` (kiln/quant's layout: integer weight, scale, offset)."""
    from kiln.quant import QuantizedLinear, parse_scheme

    names = ["q", "k", "v", "o", "gate", "up", "down"]
    bits, scales, offsets = list(layer.bits), list(layer.scales), list(layer.offsets)
    for i, name in enumerate(names):
        if "qkvogud"[i] not in which:
            continue
        quantized = QuantizedLinear.from_float(getattr(layer, name).float(), None, parse_scheme(*scheme))
        setattr(layer, name, quantized.qweight)
        bits[i], scales[i], offsets[i] = quantized.scheme.bits, quantized.scale, quantized.offset
    layer.bits, layer.scales, layer.offsets = tuple(bits), tuple(scales), tuple(offsets)
    return layer


@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "int4-g64-zp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["qkvogud", "qvd"])  # all projections, or a mix with float weights
def test_quantized_projections_match_reference(scheme, dtype, which):
    """Weight-only int8/int4 projections (kiln/quant's QuantizedLinear layout) inside the op: equal to the
    reference with the weights dequantized, biases included."""
    scheme = {"int8": ("int8",), "int4-g32": ("int4", 32), "int4-g64-zp": ("int4", 64, False)}[scheme]
    generator = torch.Generator().manual_seed(7)
    hidden, heads, kv_heads, head_dim, inner = 128, 4, 2, 32, 192
    layer = random_layer(hidden, heads, kv_heads, head_dim, inner, dtype, True, generator)
    layer = quantize_projections(layer, scheme, which)
    keys, values, step = decode_step([9, 40, 1], kv_heads, head_dim, 16, dtype, generator)
    x = torch.randn(3, hidden, generator=generator).to(dtype)
    angles = torch.rand(3, head_dim // 2, generator=generator) * 6
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    ref_keys, ref_values = keys.clone(), values.clone()
    expected = decoder_layer_reference(x, layer, cos, sin, ref_keys, ref_values, step)
    got = decoder_layer(x, layer, cos, sin, keys, values, step, 16)
    assert_close(got, expected, dtype)
    assert_close(keys[step.slot_mapping], ref_keys[step.slot_mapping], dtype)


@pytest.mark.parametrize("rows", [3, 20])  # within kiln::quant_linear's rows, and above (packed / int8 GEMM)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_projections_match_reference(rows, dtype):
    """w8a8 projections (bits W8A8_BITS, int8 weight, per-channel scale; where this CPU packs int8 weights
    for oneDNN, with their packed copies) in the op, beside float ones: the reference quantizes each row
    and multiplies exactly. A row's int8 code can differ by one where the op's norm output and the
    reference's differ in the last bit, hence the looser bound (a wrong weight or scale is off by O(1))."""
    from kiln.quant import QuantizedLinear, parse_scheme

    generator = torch.Generator().manual_seed(11)
    hidden, heads, kv_heads, head_dim, inner = 128, 4, 2, 32, 192
    layer = random_layer(hidden, heads, kv_heads, head_dim, inner, dtype, True, generator)
    bits, scales, packed = list(layer.bits), list(layer.scales), list(layer.packed)
    for i, name in enumerate(["q", "k", "v", "o", "gate", "up", "down"]):
        if name in ("o", "up"):
            continue  # left float
        quantized = QuantizedLinear.from_float(getattr(layer, name).float(), None, parse_scheme("w8a8"))
        setattr(layer, name, quantized.qweight)
        bits[i], scales[i] = W8A8_BITS, quantized.scale
        packed[i] = pack(quantized.qweight) if packed_rows(torch.int8) else None
    layer.bits, layer.scales, layer.packed = tuple(bits), tuple(scales), tuple(packed)
    contexts = [9, 40, 1] if rows == 3 else [5 + 3 * i for i in range(rows)]
    keys, values, step = decode_step(contexts, kv_heads, head_dim, 16, dtype, generator)
    x = torch.randn(rows, hidden, generator=generator).to(dtype)
    ref_keys, ref_values = keys.clone(), values.clone()
    expected = decoder_layer_reference(x, layer, None, None, ref_keys, ref_values, step)
    got = decoder_layer(x, layer, None, None, keys, values, step, 16)
    scale = max(1.0, expected.abs().max().item())
    assert (got.double() - expected.double()).abs().max().item() <= 0.05 * scale


def test_quantized_projection_without_scale_is_refused():
    generator = torch.Generator().manual_seed(0)
    layer = random_layer(32, 2, 2, 16, 32, torch.float32, False, generator)
    layer = quantize_projections(layer, ("int8",), "q")
    layer.scales = (None,) * 7
    keys, values, step = decode_step([3], 2, 16, 4, torch.float32, generator)
    with pytest.raises(RuntimeError, match="needs its scale"):
        decoder_layer(torch.randn(1, 32), layer, None, None, keys, values, step, 16)


@pytest.mark.skipif(
    not packing_available(),
    reason="no oneDNN bf16 packing here (no mkldnn, or no AVX-512 BW/VL/DQ or AVX-NE-CONVERT)",
)
@pytest.mark.parametrize("biases", [False, True])
def test_packed_projections_match_at_linear(biases):
    """Steps of more rows than the small-row linear takes run the projections' oneDNN-packed copies (up to
    packed_rows): the same GEMM as at::linear, so the layer equals the unpacked op's output bit for bit
    on CPUs where packing is on (AMX), and the reference within tolerance everywhere."""
    generator = torch.Generator().manual_seed(5)
    context_lens, hidden, heads, kv_heads, head_dim, inner, block_size = (
        [7, 30, 1] * 4,
        64,
        4,
        2,
        16,
        96,
        16,
    )
    layer = random_layer(hidden, heads, kv_heads, head_dim, inner, torch.bfloat16, biases, generator)
    keys, values, step = decode_step(context_lens, kv_heads, head_dim, block_size, torch.bfloat16, generator)
    x = torch.randn(len(context_lens), hidden, generator=generator).to(torch.bfloat16)
    plain_keys, plain_values = keys.clone(), values.clone()
    plain = decoder_layer(x, layer, None, None, plain_keys, plain_values, step, 1)
    projections = (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down)
    layer.packed = tuple(pack(w) for w in projections)
    got = decoder_layer(x, layer, None, None, keys, values, step, 1)
    expected = decoder_layer_reference(x, layer, None, None, keys.clone(), values.clone(), step)
    assert_close(got, expected, torch.bfloat16)
    if packed_rows(torch.bfloat16):
        assert torch.equal(got, plain)
        assert torch.equal(keys, plain_keys) and torch.equal(values, plain_values)
