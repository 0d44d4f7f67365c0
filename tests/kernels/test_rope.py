"""Fused RoPE (Triton, in place on q and k) against `apply_rope`: rotated q, k and their gradients.

Tolerances (SCALED_TOLERANCE): fp32 to round-off; fp16/bf16 to two units in the last place (the torch
reference returns fp32 when the tables are fp32; the kernel rounds once to the inputs' dtype).
"""

import pytest
import torch

from tests.kernels.helpers import DEVICE, SCALED_TOLERANCE, assert_scaled_close, needs_triton

needs_triton()

from kiln.kernels.rope import apply_rope_, rope_reference  # noqa: E402
from kiln.models.layers import RotaryEmbedding  # noqa: E402


def _tables(rows, head_dim, seed=0):
    import kiln

    config = kiln.preset("tiny", head_dim=head_dim)
    positions = torch.randint(0, 1000, (1, rows), generator=torch.Generator().manual_seed(seed))
    cos, sin = RotaryEmbedding(config)(positions.to(DEVICE), torch.float32)
    return cos[0], sin[0]  # (N, D)


def _run(fn, x, weight_q, weight_k, cos, sin):
    q, k = x @ weight_q.t(), x @ weight_k.t()  # (N, H * D) projections: not views
    q_out, k_out = fn(q, k, cos, sin)
    generator = torch.Generator().manual_seed(5)
    loss = (q_out.float() * torch.randn(q_out.shape, generator=generator).to(DEVICE)).sum()
    loss = loss + (k_out.float() * torch.randn(k_out.shape, generator=generator).to(DEVICE)).sum()
    return [q_out, k_out, *torch.autograd.grad(loss, (x, weight_q, weight_k))]


# (tokens, heads, kv_heads, head_dim): tokens 1, 17, 100; heads 1, 3, 12; GQA 1, 3, 4; head dims 8, 40, 64
SHAPES = [(1, 1, 1, 8), (17, 3, 1, 40), (100, 12, 3, 64), (17, 8, 2, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype):
    rows, heads, kv_heads, head_dim = shape
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 16, generator=generator).to(DEVICE, dtype).requires_grad_()
    weight_q = torch.randn(heads * head_dim, 16, generator=generator).to(DEVICE, dtype).requires_grad_()
    weight_k = torch.randn(kv_heads * head_dim, 16, generator=generator).to(DEVICE, dtype).requires_grad_()
    cos, sin = _tables(rows, head_dim)
    got = _run(apply_rope_, x, weight_q, weight_k, cos, sin)
    # Reference from the same low-precision projections, rotated in fp32.
    expected = _run(rope_reference, x, weight_q, weight_k, cos, sin)
    for name, g, e in zip(["q", "k", "dx", "dweight_q", "dweight_k"], got, expected, strict=True):
        assert_scaled_close(g, e, SCALED_TOLERANCE[dtype], name)


def test_rotates_in_place():
    q = torch.randn(5, 3 * 16, device=DEVICE)
    k = torch.randn(5, 16, device=DEVICE)
    cos, sin = _tables(5, 16)
    expected_q, expected_k = rope_reference(q, k, cos, sin)
    pointers = q.data_ptr(), k.data_ptr()
    q_out, k_out = apply_rope_(q, k, cos, sin)
    assert (q_out.data_ptr(), k_out.data_ptr()) == pointers
    torch.testing.assert_close(q, expected_q)
    torch.testing.assert_close(k, expected_k)


def test_views_are_rotated_into_copies():
    """Autograd cannot mark two views dirty: a view's rotation goes to a copy; the base is untouched."""
    base = torch.randn(5, 64, device=DEVICE, requires_grad=True)
    projected = base * 1
    q, k = projected[:, :48], projected[:, 48:]
    before = projected.detach().clone()
    cos, sin = _tables(5, 16)
    q_out, k_out = apply_rope_(q, k, cos, sin)
    torch.testing.assert_close(projected.detach(), before)
    expected_q, expected_k = rope_reference(before[:, :48], before[:, 48:], cos, sin)
    torch.testing.assert_close(q_out, expected_q)
    torch.testing.assert_close(k_out, expected_k)
    (q_out.sum() + k_out.sum()).backward()
    assert base.grad is not None


def test_inverse_rotation_undoes_the_rotation():
    from kiln.kernels.rope import _rotate_

    q, k = torch.randn(7, 32, device=DEVICE), torch.randn(7, 16, device=DEVICE)
    original = q.clone(), k.clone()
    cos, sin = _tables(7, 16)
    _rotate_(q, k, cos, sin, inverse=False)
    _rotate_(q, k, cos, sin, inverse=True)
    torch.testing.assert_close(q, original[0])
    torch.testing.assert_close(k, original[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_full_size_on_gpu(dtype):
    rows, heads, kv_heads, head_dim = 16384, 32, 8, 128
    x = torch.randn(rows, 64, device=DEVICE, dtype=dtype).requires_grad_()
    weight_q = torch.randn(heads * head_dim, 64, device=DEVICE, dtype=dtype).requires_grad_()
    weight_k = torch.randn(kv_heads * head_dim, 64, device=DEVICE, dtype=dtype).requires_grad_()
    cos, sin = _tables(rows, head_dim)
    got = _run(apply_rope_, x, weight_q, weight_k, cos, sin)
    expected = _run(rope_reference, x, weight_q, weight_k, cos, sin)
    for name, g, e in zip(["q", "k", "dx", "dweight_q", "dweight_k"], got, expected, strict=True):
        assert_scaled_close(g, e, SCALED_TOLERANCE[dtype], name)
