"""Shared by the kernel tests: the device kernels run on, and error checks with stated tolerances."""

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Max |error| allowed, as a fraction of the reference's largest magnitude (at least 1): fp32 kernels
# agree with their references to round-off; 16-bit ones to about two units in the last place.
SCALED_TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def needs_triton():
    return pytest.importorskip("triton")


def max_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got.float() - expected.float()).abs().max().item()


def assert_scaled_close(got: torch.Tensor, expected: torch.Tensor, tolerance: float, name: str = "") -> None:
    """max |got - expected| <= tolerance * max(1, max |expected|)."""
    assert got.shape == expected.shape, (name, got.shape, expected.shape)
    scale = max(1.0, expected.float().abs().max().item())
    error = max_error(got, expected)
    assert error <= tolerance * scale, f"{name}: error {error:.3g} > {tolerance:g} x {scale:.3g}"
