"""kiln's C++ small-M linear op (csrc/linear.cpp) against float64 references, the routing in
kiln.kernels.cpu_linear, and install/remove on a whole model.

Tolerances: fp32 to 1e-5 of the output's scale (max(1, max |reference|)). bf16 outputs are rounded once
from fp32 sums, so every element is within one bf16 unit in the last place of the scale (2^-8), and the
mean error is no worse than torch's own bf16 F.linear on the same inputs (x1.5).
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kiln.kernels import cpu_linear
from kiln.kernels.cpu_extension import cpu_ops_available

pytestmark = pytest.mark.skipif(
    not cpu_ops_available(), reason="kiln's C++ CPU ops did not build here (no compiler or OpenMP)"
)

ROWS = [1, 2, 3, 4, 5, 8, 9, 16, 17]
SHAPES = [(1, 1), (31, 7), (33, 13), (100, 33), (768, 65)]  # (K, N): K off multiples of 16/32, N odd


def _inputs(rows, in_features, out_features, dtype, bias, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    b = torch.randn(out_features, generator=generator).to(dtype) if bias else None
    return x, weight, b


def _reference(x, weight, bias):
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())


def _check(got, x, weight, bias):
    """The tolerances of the module docstring; the scaled max error."""
    expected = _reference(x, weight, bias)
    assert got.shape == expected.shape and got.dtype == x.dtype
    scale = max(1.0, expected.abs().max().item())
    error = (got.double() - expected).abs()
    if x.dtype == torch.float32:
        assert error.max().item() <= 1e-5 * scale, (error.max().item(), scale)
    else:
        assert error.max().item() <= 2**-8 * scale, (error.max().item(), scale)
        torch_error = (F.linear(x, weight, bias).double() - expected).abs()
        assert error.mean().item() <= 1.5 * torch_error.mean().item() + 1e-6 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", ROWS)
def test_op_matches_reference(rows, shape, bias, dtype):
    x, weight, b = _inputs(rows, *shape, dtype, bias)
    _check(torch.ops.kiln.linear(x, weight, b), x, weight, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_streams_a_large_weight_across_threads(dtype):
    # Many column tiles, so several threads each take a slab; every output column must be right.
    x, weight, b = _inputs(3, 96, 4099, dtype, bias=True)
    _check(torch.ops.kiln.linear(x, weight, b), x, weight, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_gives_the_same_bits_at_any_row_count(dtype):
    # Few rows stream one weight row per tile, more rows four; each output's sum runs in the same order
    # either way, so a sequence's logits do not depend on how many others share its decode step.
    x, weight, b = _inputs(64, 768, 131, dtype, bias=True)
    alone = torch.cat([torch.ops.kiln.linear(x[i : i + 1], weight, b) for i in range(64)])
    for rows in (2, 4, 5, 16, 64):
        together = torch.cat([torch.ops.kiln.linear(x[i : i + rows], weight, b) for i in range(0, 64, rows)])
        assert torch.equal(together, alone), rows


def test_op_takes_non_contiguous_inputs():
    x, weight, b = _inputs(6, 40, 9, torch.float32, bias=True)
    strided_x = x.t().contiguous().t()  # same values, column-major
    strided_weight = weight.t().contiguous().t()
    _check(torch.ops.kiln.linear(strided_x, strided_weight, b), x, weight, b)


def test_op_with_no_rows_or_no_inner_dimension():
    weight, bias = torch.randn(5, 0), torch.randn(5)
    assert torch.equal(torch.ops.kiln.linear(torch.randn(3, 0), weight, bias), bias.expand(3, 5))
    assert torch.ops.kiln.linear(torch.randn(0, 4), torch.randn(5, 4), None).shape == (0, 5)


def test_op_on_many_rows_and_on_meta_tensors():
    x, weight, b = _inputs(100, 70, 33, torch.float32, bias=True)  # 25 row tiles
    _check(torch.ops.kiln.linear(x, weight, b), x, weight, b)
    meta = torch.ops.kiln.linear(x.to("meta"), weight.to("meta"), None)
    assert meta.shape == (100, 33) and meta.device.type == "meta"


@pytest.mark.slow
def test_linear_compiles_into_one_graph():
    x, weight, b = _inputs(5, 70, 33, torch.float32, bias=True)
    compiled = torch.compile(lambda x: cpu_linear.linear(x, weight, b), fullgraph=True)
    with torch.no_grad():
        got = compiled(x)
    _check(got, x, weight, b)


@pytest.mark.parametrize(
    "x, weight, message",
    [
        (torch.randn(2, 4), torch.randn(3, 5), "K=4"),
        (torch.randn(2, 4), torch.randn(3, 4).bfloat16(), "cast one"),
        (torch.randn(2, 4).half(), torch.randn(3, 4).half(), "float32 and bfloat16"),
        (torch.randn(2, 2, 4), torch.randn(3, 4), "must be \\(M, K\\)"),
    ],
)
def test_op_says_what_is_wrong(x, weight, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.kiln.linear(x, weight, None)


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls `cpu_linear.linear` makes to the C++ op."""
    calls = []
    real = cpu_linear._kiln_linear

    def counted(rows, weight, bias):
        calls.append(tuple(rows.shape))
        return real(rows, weight, bias)

    monkeypatch.setattr(cpu_linear, "_kiln_linear", counted)
    return calls


def test_linear_flattens_leading_dims(op_calls):
    x, weight, b = _inputs(6, 33, 13, torch.float32, bias=True)
    got = cpu_linear.linear(x.view(2, 3, 33), weight, b)
    assert op_calls == [(6, 33)]
    assert got.shape == (2, 3, 13)
    _check(got.view(6, 13), x, weight, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_leaves_many_rows_and_gradients_to_torch(op_calls, dtype, monkeypatch):
    limit = min(cpu_linear.UNPACKED_MAX_ROWS[dtype], 16)  # AVX2 machines take every bf16 row count
    monkeypatch.setitem(cpu_linear.UNPACKED_MAX_ROWS, dtype, limit)  # the weight below has no packed copy
    monkeypatch.setitem(cpu_linear.MAX_ROWS, dtype, min(cpu_linear.MAX_ROWS[dtype], limit))
    x, weight, _ = _inputs(limit + 1, 33, 13, dtype, bias=False)
    cpu_linear.linear(x, weight)
    cpu_linear.linear(x[:limit], weight)
    assert op_calls == [(limit, 33)]
    weight.requires_grad_(True)
    y = cpu_linear.linear(x[:1], weight)  # needs a backward: F.linear
    y.sum().backward()
    assert op_calls == [(limit, 33)] and weight.grad is not None
    with torch.no_grad():
        cpu_linear.linear(x[:1], weight)
    assert op_calls == [(limit, 33), (1, 33)]


def test_row_limits_follow_the_cpu():
    """AMX: torch's bf16 GEMM wins from few rows; AVX2 without AVX-512: torch's bf16 GEMM is slow at every
    size, so the op takes every bf16 linear (and fp32 up to 128 rows on Zen 2); elsewhere the AVX-512
    limits."""
    amx = cpu_linear._max_rows(frozenset({"avx2", "fma", "avx512f", "amx_bf16"}))
    avx2 = cpu_linear._max_rows(frozenset({"avx2", "fma", "f16c"}))
    avx512 = cpu_linear._max_rows(frozenset({"avx2", "fma", "avx512f", "avx512_bf16"}))
    assert amx == {torch.float32: 32, torch.bfloat16: 4}
    assert avx2 == {torch.float32: 32, torch.bfloat16: cpu_linear.ALL_ROWS}
    # Zen 2 (AMD family 23): torch's fp32 GEMM is slower than the op up to 128 rows there; not on Zen 3 (25)
    zen2 = cpu_linear._max_rows(frozenset({"avx2", "fma", "f16c"}), ("AuthenticAMD", 23))
    assert zen2 == {torch.float32: 128, torch.bfloat16: cpu_linear.ALL_ROWS}
    assert cpu_linear._max_rows(frozenset({"avx2", "fma", "f16c"}), ("AuthenticAMD", 25)) == avx2
    # AVX512-BF16 without AMX (Zen 4): oneDNN's GEMM on packed weights wins from 4 rows where torch can pack
    assert avx512 == {torch.float32: 64, torch.bfloat16: 2}
    unpacked = cpu_linear._max_rows(frozenset({"avx2", "fma", "avx512f", "avx512_bf16"}), packing=False)
    assert unpacked == {torch.float32: 64, torch.bfloat16: 16}
    assert cpu_linear._max_rows(frozenset()) == unpacked


def test_bf16_packing_needs_what_onednn_reorders_on():
    """oneDNN's bf16 reorder raises on AVX2-only CPUs (Zen 3 here): packing is offered only where it runs."""
    from kiln.kernels import packed_weight

    can = packed_weight._cpu_can_pack
    assert can(frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq"}))
    assert can(frozenset({"avx2", "avx_ne_convert"}))
    assert not can(frozenset({"avx2", "fma", "f16c"})) and not can(frozenset({"avx512f", "avx512bw"}))


def test_linear_leaves_other_dtypes_and_mixtures_to_torch(op_calls):
    x, weight, b = _inputs(2, 33, 13, torch.float16, bias=True)
    assert torch.equal(cpu_linear.linear(x, weight, b), F.linear(x, weight, b))
    with pytest.raises(RuntimeError, match="same dtype"):  # torch's own message, not the op's
        cpu_linear.linear(x.float(), weight.bfloat16())
    assert op_calls == []


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_install_and_remove_on_a_model(op_calls, dtype, tied):
    from kiln.config import preset
    from kiln.models.transformer import Transformer

    config = preset("tiny", tie_word_embeddings=tied, qkv_bias=True, mlp_bias=True)
    torch.manual_seed(0)
    model = Transformer(config).to(dtype).eval()
    input_ids = torch.randint(0, config.vocab_size, (1, 4))  # within UNPACKED_MAX_ROWS on every CPU
    with torch.inference_mode():
        expected = model(input_ids).double()
        linears = cpu_linear.install_cpu_linears(model)
        assert cpu_linear.install_cpu_linears(model) == linears  # idempotent
        got = model(input_ids).double()
        # q k v o gate up down per layer, the logits, and the unused lm_head Linear when untied
        assert linears == 7 * config.num_layers + 1 + (not tied)
        assert len(op_calls) == 7 * config.num_layers + 1
        assert cpu_linear.remove_cpu_linears(model) == linears
        assert cpu_linear.remove_cpu_linears(model) == 0
        again = model(input_ids).double()
    assert len(op_calls) == 7 * config.num_layers + 1
    assert torch.equal(again, expected)
    scale = max(1.0, expected.abs().max().item())
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: rounding compounds over the layers
    assert (got - expected).abs().max().item() <= tolerance * scale


FALLBACK_SCRIPT = """
import shutil, sys
from pathlib import Path
import torch, torch.nn.functional as F
import kiln.kernels.cpu_extension as ext
from kiln.quant.weights import pack_int4

source = Path(sys.argv[1])
for name in ("linear.cpp", "quant_linear.cpp", "paged_attention.cpp", "paged_attention_simd.h",
             "paged_attention_decode.h", "simd.h", "w8a8_linear.cpp", "int8_mm.cpp", "int8_gemm.h",
             "loki_attention.cpp", "paged_attention_decode_quantized.h", "kv_code_rows.h"):
    shutil.copy(ext.CSRC / name, source / name)
ext.CSRC = source
ext.FLAGS = ext.FLAGS + sys.argv[2].split()
assert ext.cpu_ops_available()
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for rows, k, n in [(1, 33, 13), (5, 100, 7), (17, 768, 9)]:
        x, w, b = (torch.randn(rows, k).to(dtype), torch.randn(n, k).to(dtype), torch.randn(n).to(dtype))
        expected = F.linear(x.double(), w.double(), b.double())
        scale = max(1.0, expected.abs().max().item())
        error = (torch.ops.kiln.linear(x, w, b).double() - expected).abs().max().item()
        assert error <= (1e-5 if dtype == torch.float32 else 2**-8) * scale, (dtype, rows, k, n, error)
# kiln::quant_linear's fallback loops: int8 per channel, int4 in groups of 32 with zero points
for rows in (1, 6):
    for k in (64, 75):  # 75: a K tail
        x = torch.randn(rows, k)
        q8, s8 = torch.randint(-127, 128, (9, k), dtype=torch.int8), torch.rand(9, 1) + 0.1
        got = torch.ops.kiln.quant_linear(x, q8, s8, None, None, 8)
        assert torch.allclose(got, x @ (q8.float() * s8).T, atol=1e-4, rtol=1e-5), ("int8", k)
    x = torch.randn(rows, 64)
    u = torch.randint(0, 16, (9, 64), dtype=torch.uint8)
    packed = pack_int4(u)
    s4, z = torch.rand(9, 2) + 0.1, torch.randint(0, 16, (9, 2)).float()
    got = torch.ops.kiln.quant_linear(x, packed, s4, s4 * z, None, 4)
    w = (u.float() - z.repeat_interleave(32, 1)) * s4.repeat_interleave(32, 1)
    assert torch.allclose(got, x @ w.T, atol=1e-4, rtol=1e-5), "int4"
# kiln::w8a8_linear on a weight packed for oneDNN (CPUs with AMX): the ATen steps' bits
from kiln.kernels.packed_weight import pack, packed_rows
from kiln.quant import QuantizedLinear, parse_scheme
from kiln.quant import weights as qw
if packed_rows(torch.int8):
    for dtype in (torch.float32, torch.bfloat16):
        for k in (37, 768):
            layer = QuantizedLinear.from_float(torch.randn(65, k), torch.randn(65), parse_scheme("w8a8"))
            pack(layer.qweight)
            x = torch.randn(17, k).to(dtype) * 3
            q, x_scale = qw.quantize_rows(x)
            sums = torch._int_mm(q, layer.qweight.T).float()
            expected = (sums * x_scale * layer.scale.T).to(dtype) + layer.bias.to(dtype)
            with torch.no_grad():
                assert torch.equal(layer(x), expected), ("w8a8 packed", dtype, k)
# paged attention's helpers (dots, value accumulation, exp; fp32 and widened bf16 pools)
from tests.kernels.test_cpu_paged_attention import SHAPES, assert_close, op_inputs
from kiln.kernels.cpu_paged_attention import paged_attention, paged_attention_reference
for shape in SHAPES[1:5]:
    for dtype in (torch.float32, torch.bfloat16):
        inputs = op_inputs(*shape, dtype)
        assert_close(paged_attention(*inputs), paged_attention_reference(*inputs), dtype)
# the quantized pool's decode walk (AVX2: 8 lanes) and tile loop against dequantize-then-reference
import os
from tests.kernels.test_kv_quant import SHAPES as KV_SHAPES, _pool
from kiln.kernels.cpu_paged_attention import paged_attention_quantized, paged_attention_quantized_reference
for query_lens, context_lens, heads, kv_heads, head_dim, block_size in KV_SHAPES[-3:]:
    for bits in (8, 4):
        g = torch.Generator().manual_seed(bits)
        *pool, tables = _pool(context_lens, kv_heads, head_dim, block_size, bits, g)
        q = torch.randn(sum(query_lens), heads, head_dim, generator=g)
        starts = [sum(query_lens[:i]) for i in range(len(query_lens))]
        meta = [torch.tensor(x, dtype=torch.int32) for x in (starts, query_lens, context_lens)]
        args = (q, *pool, bits, tables, *meta, block_size)
        for setting in ("1", "0"):
            os.environ["KILN_PA_DECODE"] = setting
            got, expected = paged_attention_quantized(*args), paged_attention_quantized_reference(*args)
            assert_close(got, expected, torch.float32)
os.environ.pop("KILN_PA_DECODE")
# Loki's op (scores, selection: the vector paths are AVX-512 only) against its torch path, short and long
from tests.kernels.test_loki_attention import _inputs, _paged
from kiln.kernels.loki_attention import loki_decode_attention
for length in (40, 700):
    q, k, v = _inputs(batch=1, length=length)
    keys, values, tables = _paged(k, v, 16)
    args = (q[:, :, -1], keys, values, tables, torch.tensor([length], dtype=torch.int32), 16, 6, 0.25)
    cpp, reference = loki_decode_attention(*args, use_cpp=True), loki_decode_attention(*args, use_cpp=False)
    torch.testing.assert_close(cpp, reference, atol=2e-6, rtol=1e-5)
print("fallback ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags",
    [
        "-mno-avx512f",  # the AVX2 + FMA tiles where the machine has them (else the scalar loops)
        "-mno-avx512f -mno-avx2 -mno-fma",  # the scalar loops
    ],
)
def test_fallback_builds_match_reference(tmp_path, flags):
    """The linear, quantized linear, w8a8 (on a packed weight, where int8 packing is on), paged-attention
    (model-dtype and quantized pools) and Loki ops built without AVX-512, and without AVX2 (separate builds
    and processes), give the same results."""
    source = tmp_path / "csrc"
    source.mkdir()
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FALLBACK_SCRIPT), str(source), flags],
        capture_output=True,
        text=True,
        env={**_environment(), "KILN_CACHE": str(tmp_path / "cache")},
        timeout=600,
    )
    assert completed.returncode == 0 and "fallback ok" in completed.stdout, completed.stderr[-3000:]


def _environment() -> dict[str, str]:
    import os

    root = str(Path(cpu_linear.__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
