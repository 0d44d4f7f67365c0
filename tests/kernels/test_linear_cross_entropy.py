"""Chunked linear + cross-entropy equals the unfused definition, gradients included, and uses less memory."""

import subprocess
import sys

import pytest
import torch

from kiln.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference


@pytest.mark.parametrize("tokens", [1, 17, 1000])
@pytest.mark.parametrize("chunk_size", [1, 7, 256, 4096])
def test_matches_reference_fp32(tokens, chunk_size):
    generator = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, 24, generator=generator, requires_grad=True)
    weight = (torch.randn(101, 24, generator=generator) * 0.3).requires_grad_()
    targets = torch.randint(0, 101, (tokens,), generator=generator)
    targets[::5] = -100
    if (targets == -100).all():
        targets[0] = 3
    expected = linear_cross_entropy_reference(hidden, weight, targets)
    expected_grads = torch.autograd.grad(expected * 2.5, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    got_grads = torch.autograd.grad(got * 2.5, (hidden, weight))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_batched_shapes_and_no_grad():
    hidden = torch.randn(2, 9, 16)
    weight = torch.randn(33, 16)
    targets = torch.randint(0, 33, (2, 9))
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    torch.testing.assert_close(got, linear_cross_entropy_reference(hidden, weight, targets))


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_autocast_tracks_fp32(dtype):
    hidden = torch.randn(300, 64, requires_grad=True)
    weight = (torch.randn(500, 64) * 0.1).requires_grad_()
    targets = torch.randint(0, 500, (300,))
    expected = linear_cross_entropy_reference(hidden, weight, targets)
    with torch.autocast("cpu", dtype=dtype):
        got = linear_cross_entropy(hidden, weight, targets, chunk_size=64)
    got.backward()
    assert abs(got.item() - expected.item()) < 2e-2
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32


_PEAK = """
import resource, sys, torch
from kiln.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
torch.manual_seed(0)
hidden = torch.randn(8192, 64, requires_grad=True)
weight = (torch.randn(50_000, 64) * 0.02).requires_grad_()
targets = torch.randint(0, 50_000, (8192,))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fn = linear_cross_entropy if sys.argv[1] == "fused" else linear_cross_entropy_reference
fn(hidden, weight, targets).backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_peak_memory_is_lower_than_logits_plus_cross_entropy():
    """8192 tokens, vocab 50k: the unfused path holds (8192, 50000) fp32 logits (1.6 GB) and more."""
    peaks = {}
    for kind in ("fused", "reference"):
        out = subprocess.run([sys.executable, "-c", _PEAK, kind], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        peaks[kind] = int(out.stdout.strip())
    fused, reference = peaks["fused"] / 2**20, peaks["reference"] / 2**20
    print(f"peak extra memory: fused {fused:.0f} MiB, reference {reference:.0f} MiB")
    assert peaks["reference"] > 1.6e9 and peaks["fused"] < peaks["reference"] / 4
