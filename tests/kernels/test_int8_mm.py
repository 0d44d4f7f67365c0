"""kiln::int8_mm (csrc/int8_mm.cpp) against its torch reference, torch._int_mm: exact int32 sums."""

import pytest
import torch

from kiln.kernels.cpu_extension import cpu_ops_available

pytestmark = pytest.mark.skipif(not cpu_ops_available(), reason="kiln's C++ CPU ops are not built here")


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 7, 64])
@pytest.mark.parametrize(
    ("in_features", "out_features"), [(1, 1), (15, 3), (16, 2), (17, 65), (768, 33), (2049, 5)]
)
def test_int8_mm_equals_int_mm(rows, in_features, out_features):
    generator = torch.Generator().manual_seed(rows * 1000 + in_features)
    a = torch.randint(-128, 128, (rows, in_features), dtype=torch.int8, generator=generator)
    b = torch.randint(-128, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    expected = (a.long() @ b.long().T).int()  # torch._int_mm needs rows > 16 and K, N multiples of 8
    assert torch.equal(torch.ops.kiln.int8_mm(a, b), expected)
    if rows > 16 and in_features % 8 == 0 and out_features % 8 == 0:
        assert torch.equal(torch.ops.kiln.int8_mm(a, b), torch._int_mm(a, b.T))


def test_int8_mm_extremes_and_strides():
    """All -128 (the largest products) over a long K, and non-contiguous inputs."""
    a = torch.full((3, 4096), -128, dtype=torch.int8)
    assert torch.equal(torch.ops.kiln.int8_mm(a, a), torch.full((3, 3), 4096 * 128 * 128, dtype=torch.int32))
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (6, 40), dtype=torch.int8, generator=generator).T  # (40, 6), strided
    b = torch.randint(-128, 128, (6, 9), dtype=torch.int8, generator=generator).T  # (9, 6)
    assert not a.is_contiguous() and not b.is_contiguous()
    assert torch.equal(torch.ops.kiln.int8_mm(a, b), (a.long() @ b.long().T).int())
    empty = torch.ops.kiln.int8_mm(torch.zeros(2, 0, dtype=torch.int8), torch.zeros(3, 0, dtype=torch.int8))
    assert torch.equal(empty, torch.zeros(2, 3, dtype=torch.int32))


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int8), "int8 a and b"),
        (torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2, 4, dtype=torch.int8), "K=3 but b has K=4"),
        (torch.zeros(3, dtype=torch.int8), torch.zeros(2, 3, dtype=torch.int8), r"a must be \(M, K\)"),
    ],
)
def test_int8_mm_bad_input(a, b, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.kiln.int8_mm(a, b)
