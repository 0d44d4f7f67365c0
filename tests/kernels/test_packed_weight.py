"""kiln.kernels.packed_weight: bf16 weights packed once for oneDNN, the rows cpu_linear.linear sends them, and
the repacking of a weight changed in place. Where packing is on (AMX or AVX512-BF16 CPUs) the packed GEMM
must give F.linear's bits; elsewhere the copy is still made on request and must agree within bf16
rounding."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kiln.kernels import cpu_linear, packed_weight
from kiln.kernels.packed_weight import pack, pack_linears, packed, packed_linear, packing_available

pytestmark = pytest.mark.skipif(
    not packing_available(),
    reason="no oneDNN bf16 packing here (no mkldnn, or no AVX-512 BW/VL/DQ or AVX-NE-CONVERT)",
)
BF16 = dict(rtol=2e-2, atol=2e-2)


def _weights(rows, in_features, out_features, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    bias = torch.randn(out_features, generator=generator).bfloat16()
    return x, weight, bias


@pytest.mark.parametrize("rows", [1, 5, 64, 300])
@pytest.mark.parametrize("shape", [(33, 7), (768, 65), (100, 2304)], ids=str)
def test_packed_linear_equals_f_linear(rows, shape):
    x, weight, bias = _weights(rows, *shape)
    got = packed_linear(x, pack(weight), bias)
    expected = F.linear(x, weight, bias)
    if packed_weight.packed_rows(torch.bfloat16):
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got.float(), expected.float(), **BF16)


def test_weight_changed_in_place_is_packed_again():
    x, weight, _ = _weights(8, 64, 48)
    first = pack(weight)
    assert packed(weight) is first
    with torch.no_grad():
        weight.mul_(2)
    again = packed(weight)
    assert again is not first
    torch.testing.assert_close(
        packed_linear(x, again).float(), F.linear(x, weight).float(), rtol=2e-2, atol=2e-2
    )
    assert packed(torch.zeros(2, 2)) is None  # never packed


def test_linear_uses_the_packed_copy_between_the_op_and_the_limit(monkeypatch):
    monkeypatch.setattr(packed_weight, "PACKED_ROWS", {torch.bfloat16: 32})
    calls = []
    real = cpu_linear.packed_linear
    monkeypatch.setattr(cpu_linear, "packed_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    x, weight, bias = _weights(64, 40, 24)
    pack(weight)
    small = cpu_linear.MAX_ROWS[torch.bfloat16]
    for rows in (1, small, small + 1, 32, 33, 64):
        got = cpu_linear.linear(x[:rows].view(1, rows, 40), weight, bias)
        assert got.shape == (1, rows, 24)
        torch.testing.assert_close(
            got.float()[0], F.linear(x[:rows], weight, bias).float(), rtol=2e-2, atol=2e-2
        )
    assert calls == [rows for rows in (small + 1, 32) if rows > small]
    x.requires_grad_(True)
    with torch.enable_grad():
        cpu_linear.linear(x[:8], weight, bias).float().sum().backward()  # no backward in the packed op
    assert x.grad is not None and len(calls) == 2 - (small >= 32)


def test_pack_linears_packs_bf16_linears_and_the_head_once(monkeypatch):
    monkeypatch.setattr(packed_weight, "PACKED_ROWS", {torch.bfloat16: 64})

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 16, bias=False)
            self.b.weight = self.a.weight.__class__(torch.randn(16, 32))  # a float32 one stays unpacked
            self.head = nn.Linear(16, 100, bias=False)

        @property
        def output_weight(self):
            return self.head.weight

    model = Model()
    model.a.bfloat16()
    model.head.bfloat16()
    size = (32 * 16 + 100 * 16) * 2
    assert pack_linears(model, budget=size - 1) == (0, size)  # over the budget: nothing is packed
    assert packed(model.a.weight) is None and packed(model.head.weight) is None
    assert pack_linears(model, budget=size) == (size, 0)
    assert packed(model.a.weight) is not None and packed(model.head.weight) is not None
    assert packed(model.b.weight) is None


def test_inference_tensors_pack_and_keep_their_copy():
    with torch.inference_mode():
        x, weight, bias = _weights(8, 64, 48)
        copy = pack(weight)
        assert packed(weight) is copy  # no version counter: taken as unchanged
        torch.testing.assert_close(
            packed_linear(x, copy, bias).float(), F.linear(x, weight, bias).float(), **BF16
        )


def test_packing_follows_the_cpu():
    """Packed bf16 weights serve up to 256 rows on AMX CPUs, up to 1024 (the engine's step budget) on
    AVX512-BF16 ones without AMX, and nowhere else (not measured to win there)."""
    rows = packed_weight._packed_rows
    assert rows(frozenset({"avx512f", "avx512_bf16", "amx_bf16"})) == {torch.bfloat16: 256}
    assert rows(frozenset({"avx512f", "avx512_bf16"})) == {torch.bfloat16: 1024}
    assert rows(frozenset({"avx512f", "avx2"})) == {} == rows(frozenset())
