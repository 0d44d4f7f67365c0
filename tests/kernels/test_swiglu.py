"""Fused SwiGLU (Triton) against `F.silu(gate) * up`: output, dgate, dup.

Tolerances (SCALED_TOLERANCE): fp32 to round-off, fp16/bf16 to two units in the last place.
"""

import pytest
import torch

from tests.kernels.helpers import DEVICE, SCALED_TOLERANCE, assert_scaled_close, needs_triton

needs_triton()

from kiln.kernels.swiglu import swiglu, swiglu_reference  # noqa: E402


def _check(shape, dtype):
    generator = torch.Generator().manual_seed(0)
    gate, up = (
        (torch.randn(shape, generator=generator) * 3).to(DEVICE, dtype).requires_grad_() for _ in range(2)
    )
    grad = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    got_out = swiglu(gate, up)
    got = [got_out, *torch.autograd.grad(got_out, (gate, up), grad)]
    # The reference in fp32 from the same inputs, so only the kernel's rounding is measured.
    gate32, up32 = (x.detach().float().requires_grad_() for x in (gate, up))
    expected_out = swiglu_reference(gate32, up32)
    expected = [expected_out, *torch.autograd.grad(expected_out, (gate32, up32), grad.float())]
    assert got_out.dtype == dtype
    for name, g, e in zip(["out", "dgate", "dup"], got, expected, strict=True):
        assert_scaled_close(g, e, SCALED_TOLERANCE[dtype], name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1,), (17, 3), (2, 9, 1000)], ids=str)
def test_matches_reference(shape, dtype):
    _check(shape, dtype)


def test_non_contiguous_inputs():
    gate = torch.randn(6, 40, device=DEVICE)[:, ::2].requires_grad_()
    up = torch.randn(6, 20, device=DEVICE).t().contiguous().t().requires_grad_()
    out = swiglu(gate, up)
    torch.testing.assert_close(out, swiglu_reference(gate, up))
    out.sum().backward()
    torch.testing.assert_close(gate.grad, torch.autograd.grad(swiglu_reference(gate, up).sum(), gate)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_full_size_on_gpu(dtype):
    _check((8, 4096, 11008), dtype)
