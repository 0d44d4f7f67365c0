"""QuantizedLinear: quantize -> dequantize error within each scheme's bound, the fast paths (kiln's C++
op, torch._int_mm) against the torch reference on odd shapes, batch 1/7/64, fp32 and bf16 activations.

Tolerances: against the exact result of the dequantized weight (float64), fp32 outputs are within 1e-5 of
the output's scale (max(1, max |exact|)); bf16 outputs within 2^-7 of it (the reference itself rounds the
dequantized weight to bf16; the op rounds once at the end). w8a8's integer sums are exact in both paths.
"""

import pytest
import torch

from kiln.errors import KilnError
from kiln.kernels.cpu_extension import cpu_ops_available
from kiln.kernels.packed_weight import pack, packed_rows
from kiln.quant import QuantizedLinear, parse_scheme
from kiln.quant import weights as qw

SCHEMES = [
    parse_scheme("int8"),
    parse_scheme("int4", 32),
    parse_scheme("int4", 64, symmetric=False),
    parse_scheme("int4", 128),
    parse_scheme("w8a8"),
]
# (in, out): in off multiples of 16 where the scheme allows (int8, w8a8), out odd.
SHAPES = {"int8": [(33, 7), (100, 65), (768, 33)], "w8a8": [(33, 7), (100, 65), (768, 33)]}
INT4_SHAPES = [(128, 7), (256, 65), (384, 33)]
needs_op = pytest.mark.skipif(not cpu_ops_available(), reason="kiln's C++ CPU ops did not build here")


def _shapes(scheme):
    return SHAPES.get(scheme.name, INT4_SHAPES)


def _layer(scheme, in_features, out_features, bias=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    b = torch.randn(out_features, generator=generator) if bias else None
    return weight, QuantizedLinear.from_float(weight, b, scheme, name="layer")


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_quantize_error_within_bound(scheme):
    for in_features, out_features in _shapes(scheme):
        weight, layer = _layer(scheme, in_features, out_features)
        error = (layer.dequantized_weight() - weight).abs()
        groups = layer.scale.shape[1]
        bound = (layer.scale / 2).repeat_interleave(in_features // groups, dim=1)
        assert (error <= bound * (1 + 1e-5)).all()
        # a scale is no larger than the range needs: max |w| / 127 (int8), / 7.5 (int4 sym), range / 15
        assert layer.scale.max() <= weight.abs().max() / (127 if scheme.bits == 8 else 7.5) + 1e-6


def test_int4_pack_roundtrip():
    u = torch.randint(0, 16, (5, 96), dtype=torch.uint8)
    assert torch.equal(qw.unpack_int4(qw.pack_int4(u)), u)


def _check(got, layer, x):
    exact = x.double() @ layer.dequantized_weight().double().T
    if layer.bias is not None:
        exact = exact + layer.bias.double()
    if layer.scheme.name == "w8a8":
        exact = layer.reference(x.float()).double()
    scale = max(1.0, exact.abs().max().item())
    tolerance = 1e-5 if x.dtype == torch.float32 else 2**-7
    assert got.dtype == x.dtype and got.shape == exact.shape
    assert (got.double() - exact).abs().max().item() <= tolerance * scale


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_fast_path_matches_reference(scheme, rows, dtype):
    for bias in (False, True):
        for in_features, out_features in _shapes(scheme):
            _, layer = _layer(scheme, in_features, out_features, bias)
            x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
            with torch.no_grad():
                fast, reference = layer(x), layer.reference(x)
            _check(reference, layer, x)
            _check(fast, layer, x)


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 3, 6])
def test_int4_op_without_offsets(rows, dtype):
    """kiln::quant_linear at 4 bits with no offset (zero points 0): the bf16 tiles hold each weight as
    128 + u and take the 128 back through the zero-point term, which must happen without offsets too."""
    from kiln.quant.weights import pack_int4

    generator = torch.Generator().manual_seed(rows)
    u = torch.randint(0, 16, (37, 256), dtype=torch.uint8, generator=generator)
    scale = torch.rand(37, 4, generator=generator) + 0.1
    x = torch.randn(rows, 256, generator=generator).to(dtype)
    got = torch.ops.kiln.quant_linear(x, pack_int4(u), scale, None, None, 4)
    exact = x.double() @ (u.double() * scale.double().repeat_interleave(64, 1)).T
    tolerance = 1e-5 if dtype == torch.float32 else 2**-7
    assert (got.double() - exact).abs().max().item() <= tolerance * max(1.0, exact.abs().max().item())


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("in_features", [4197, 8192])
def test_int8_op_on_long_rows_at_the_extremes(in_features, dtype):
    """The int8 op's integer sums (x in fixed point on VNNI CPUs) over rows longer than one 4096-element
    chunk, with weights at +-127 and x mixing its largest values with ones 10^10 smaller: no int32 overflow,
    no precision lost beyond fp32's rounding of the sums."""
    generator = torch.Generator().manual_seed(in_features)
    q = torch.where(torch.rand(5, in_features, generator=generator) < 0.5, 127, -127).to(torch.int8)
    q[0] = 127  # every product of row 0 with the all-max x row at its largest
    scale = torch.rand(5, 1, generator=generator) + 0.5
    x = torch.randn(3, in_features, generator=generator) * 1e-6
    x[0] = 3.0e4
    x[1, ::3] = -2.5e4
    x = x.to(dtype)
    got = torch.ops.kiln.quant_linear(x, q, scale, None, None, 8)
    exact = x.double() @ (q.double() * scale.double()).T
    tolerance = 1e-5 if dtype == torch.float32 else 2**-7
    assert (got.double() - exact).abs().max().item() <= tolerance * exact.abs().max().item()


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8_op_rows_holding_inf_or_nan(dtype):
    """A row with an inf or NaN gives the reference's inf/NaN outputs, and the finite rows beside it the bits
    they have alone."""
    _, layer = _layer(parse_scheme("int8"), 100, 9, bias=True)
    x = torch.randn(4, 100, generator=torch.Generator().manual_seed(3)).to(dtype)
    x[1, 7] = float("inf")
    x[3, 50] = float("nan")
    with torch.no_grad():
        got = layer(x)
        assert torch.equal(got[0], layer(x[0:1])[0]) and torch.equal(got[2], layer(x[2:3])[0])
        torch.testing.assert_close(got[1:2], layer.reference(x[1:2]), equal_nan=True, rtol=0.02, atol=0.02)
    assert got[3].isnan().all() and not got[[0, 2]].isnan().any()


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scheme", SCHEMES[:4], ids=lambda s: s.describe())
def test_op_gives_a_row_the_same_bits_at_any_row_count(scheme, dtype):
    # the op's tiles take 1-4 x rows at a time (one weight row wide on AMD, four on Intel, 67 outputs leaving
    # a narrower edge tile): a row's sums run in the same order whichever tile holds it
    _, layer = _layer(scheme, 256, 67, bias=True)
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        alone = torch.cat([layer(x[i : i + 1]) for i in range(16)])
        for rows in (2, 5, 16):
            assert torch.equal(torch.cat([layer(x[i : i + rows]) for i in range(0, 16, rows)]), alone), rows


@needs_op
def test_op_is_used_for_decode_rows(monkeypatch):
    _, layer = _layer(parse_scheme("int4", 32), 64, 8)
    calls = []
    op = torch.ops.kiln.quant_linear
    monkeypatch.setattr(torch.ops.kiln, "quant_linear", lambda *a: calls.append(1) or op(*a))
    with torch.no_grad():
        layer(torch.randn(1, 3, 64))
        assert calls == [1]
        layer(torch.randn(65, 64))
        assert calls == [1]


def test_leading_dims_and_reference_off_op():
    _, layer = _layer(parse_scheme("int8"), 48, 10, bias=True)
    x = torch.randn(2, 3, 48)
    y = layer.reference(x)
    assert y.shape == (2, 3, 10)
    torch.testing.assert_close(y, x @ layer.dequantized_weight().T + layer.bias)


def test_group_size_not_dividing_names_the_tensor():
    with pytest.raises(KilnError, match=r"layer\.weight: int4 group size 128 does not divide its 96"):
        QuantizedLinear.from_float(torch.randn(4, 96), None, parse_scheme("int4", 128), name="layer")


@pytest.mark.parametrize(
    ("name", "group_size", "symmetric", "message"),
    [
        ("int3", None, True, "unknown quantization scheme"),
        ("int4", 48, True, "group size must be one of"),
        ("int8", 64, True, "symmetric per output channel"),
    ],
)
def test_bad_schemes(name, group_size, symmetric, message):
    with pytest.raises(KilnError, match=message):
        parse_scheme(name, group_size, symmetric)


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 16, 17, 64])
@pytest.mark.parametrize(
    ("limit", "int8_mm"), [(16, False), (0, True), (None, None)], ids=["vnni", "no-vnni", "this-cpu"]
)
@pytest.mark.parametrize("in_features", [768, 37])
def test_w8a8_op_equals_its_steps_in_torch(rows, dtype, limit, int8_mm, in_features, monkeypatch):
    """kiln::w8a8_linear is QuantizedLinear's w8a8 forward in one call: bit for bit the same steps in torch
    (quantize_rows, kiln::quant_linear up to W8A8_MAX_OP_ROWS rows, exact integer sums above (torch._int_mm
    or kiln::int8_mm, the same int32), scales, bias), as VNNI CPUs, CPUs without and this CPU run it."""
    import kiln.quant.linear as quant_linear

    if limit is not None:
        monkeypatch.setattr(quant_linear, "W8A8_MAX_OP_ROWS", limit)
        monkeypatch.setattr(quant_linear, "W8A8_KILN_INT8_MM", int8_mm)

    _, layer = _layer(parse_scheme("w8a8"), in_features, 65, bias=True)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).to(dtype) * 3
    q, x_scale = qw.quantize_rows(x)
    if rows <= quant_linear.W8A8_MAX_OP_ROWS:
        sums = torch.ops.kiln.quant_linear(q.float(), layer.qweight, layer.scale, None, None, 8)
        expected = (sums * x_scale).to(dtype)
    else:
        expected = (torch._int_mm(q, layer.qweight.T).float() * x_scale * layer.scale.T).to(dtype)
    expected = expected + layer.bias.to(dtype)
    with torch.no_grad():
        got = layer(x)
    assert torch.equal(got, expected)


needs_int8_packing = pytest.mark.skipif(
    not cpu_ops_available() or not packed_rows(torch.int8),
    reason="int8 weights are packed for oneDNN only on CPUs with AMX-INT8 (and kiln's C++ ops built)",
)


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [17, 64])
def test_w8a8_fused_steps_keep_the_bits_past_2_to_the_24(rows, dtype):
    """Above the op's rows without a packed weight (torch._int_mm on VNNI CPUs, kiln's int8 GEMM without):
    the fused quantize and epilogue give the ATen steps' bits where the int32 sums pass 2^24 (2,048
    in-features, every value +-127 and +-1), so their rounding to fp32 is compared too."""
    _, layer = _layer(parse_scheme("w8a8"), 2048, 65, bias=True)
    generator = torch.Generator().manual_seed(rows)
    layer.qweight = torch.where(torch.rand(65, 2048, generator=generator) < 0.5, 127, -127).to(torch.int8)
    x = torch.where(torch.rand(rows, 2048, generator=generator) < 0.6, 1.0, -1.0).to(dtype)
    q, x_scale = qw.quantize_rows(x)
    expected = (torch._int_mm(q, layer.qweight.T).float() * x_scale * layer.scale.T).to(dtype)
    expected = expected + layer.bias.to(dtype)
    with torch.no_grad():
        got = layer(x)
    assert torch.equal(got, expected)


@needs_int8_packing
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [17, 64, 300])
@pytest.mark.parametrize("in_features", [768, 37, 2048])
def test_w8a8_on_a_packed_weight_equals_its_steps_in_torch(rows, dtype, in_features):
    """Above the op's rows, w8a8 on a weight packed for oneDNN (AMX CPUs) gives the bits of the ATen
    steps on torch._int_mm's sums; at 2048 in-features with every value at +-127 the sums pass 2^24, so
    their rounding to fp32 is compared too."""
    import kiln.quant.linear as quant_linear

    _, layer = _layer(parse_scheme("w8a8"), in_features, 65, bias=True)
    generator = torch.Generator().manual_seed(rows)
    if in_features == 2048:
        layer.qweight = torch.where(torch.rand(65, in_features, generator=generator) < 0.5, 127, -127).to(
            torch.int8
        )
        x = torch.where(torch.rand(rows, in_features, generator=generator) < 0.6, 1.0, -1.0).to(dtype)
    else:
        x = torch.randn(rows, in_features, generator=generator).to(dtype) * 3
    pack(layer.qweight)
    q, x_scale = qw.quantize_rows(x)
    expected = (torch._int_mm(q, layer.qweight.T).float() * x_scale * layer.scale.T).to(dtype)
    expected = expected + layer.bias.to(dtype)
    assert rows > quant_linear.W8A8_MAX_OP_ROWS
    with torch.no_grad():
        got = layer(x)
    assert torch.equal(got, expected)


@needs_int8_packing
def test_w8a8_uses_the_packed_copy_above_the_op_rows():
    """The packed copy is what w8a8 multiplies above the op's rows (a copy of another weight changes the
    result), and a weight changed in place is packed again."""
    _, layer = _layer(parse_scheme("w8a8"), 64, 24)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = layer(x)
        other = layer.qweight.neg()
        pack(other)
        layer.qweight.__dict__["_kiln_packed"] = (layer.qweight._version, other.__dict__["_kiln_packed"][1])
        assert torch.equal(layer(x), -plain)
        layer.qweight.add_(0)  # a new version: packed again from the weight itself
        assert torch.equal(layer(x), plain)


def test_int8_packing_only_with_amx():
    """oneDNN's prepacked int8 GEMM runs its scalar reference kernel on AVX512-VNNI without AMX (a Zen 4
    EPYC: 1,300x torch._int_mm's time), so only AMX CPUs pack w8a8's weights."""
    from kiln.kernels.packed_weight import _int8_packing

    zen4 = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"})
    assert not _int8_packing(zen4)
    assert not _int8_packing(frozenset({"avx2", "fma", "avx_vnni"}))
    assert _int8_packing(zen4 | {"amx_int8", "amx_tile"}) == torch.backends.mkldnn.is_available()


def test_pack_linears_packs_w8a8_weights_where_int8_packing_is_on():
    from kiln.kernels.packed_weight import has_packed, pack_linears

    model = torch.nn.Sequential(QuantizedLinear.from_float(torch.randn(24, 64), None, parse_scheme("w8a8")))
    model.append(QuantizedLinear.from_float(torch.randn(24, 64), None, parse_scheme("int8")))
    packed_bytes, _ = pack_linears(model)
    assert has_packed(model[0].qweight) == bool(packed_rows(torch.int8))
    assert packed_bytes == (24 * 64 if packed_rows(torch.int8) else 0)
    assert not has_packed(model[1].qweight)  # weight-only int8 runs kiln's op, never oneDNN's int8 GEMM


@pytest.mark.parametrize(
    ("limit", "int8_mm", "int_mm_calls"), [(16, False, 1), (0, True, 0)], ids=["vnni", "no-vnni"]
)
def test_w8a8_without_the_cpp_ops(limit, int8_mm, int_mm_calls, monkeypatch):
    """Without kiln's C++ ops, w8a8 takes torch._int_mm only where the op would (VNNI CPUs, above its row
    limit); without VNNI (where _int_mm is slow) the reference. Both give the same integer sums."""
    import kiln.quant.linear as quant_linear

    monkeypatch.setattr(quant_linear, "cpu_ops_built", lambda: False)
    monkeypatch.setattr(quant_linear, "W8A8_MAX_OP_ROWS", limit)
    monkeypatch.setattr(quant_linear, "W8A8_KILN_INT8_MM", int8_mm)
    calls = []
    int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda *args: calls.append(1) or int_mm(*args))
    _, layer = _layer(parse_scheme("w8a8"), 64, 24, bias=True)
    x = torch.randn(17, 64, generator=torch.Generator().manual_seed(0))
    q, x_scale = qw.quantize_rows(x)
    with torch.no_grad():
        got = layer(x)
    assert len(calls) == int_mm_calls
    expected = (int_mm(q, layer.qweight.T).float() * x_scale * layer.scale.T) + layer.bias
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)  # float64 vs fp32 scaling of one sum


def test_op_row_limits_follow_the_cpu():
    """Without AVX-512 (AVX2 only) the op takes every row count of bf16 x (torch's bf16 GEMM there is
    slower); w8a8 takes kiln::int8_mm at every row count without VNNI (torch._int_mm is slower), else the op
    up to 16 rows and torch._int_mm above."""
    from kiln.kernels.cpu_linear import ALL_ROWS
    from kiln.quant.linear import _op_row_limits

    zen3 = _op_row_limits(frozenset({"avx2", "fma", "f16c"}))
    zen4 = _op_row_limits(frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"}))
    assert zen3 == ({torch.float32: 16, torch.bfloat16: ALL_ROWS}, 0, True)  # w8a8: kiln::int8_mm
    assert zen4 == ({torch.float32: 16, torch.bfloat16: 16}, 16, False)  # w8a8: torch._int_mm above 16
    assert _op_row_limits(frozenset({"avx2", "fma", "f16c", "avx_vnni"}))[1:] == (16, False)
