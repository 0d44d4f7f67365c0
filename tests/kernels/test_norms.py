"""Fused RMSNorm / LayerNorm (Triton) against the torch references: outputs, dx, dweight (and dbias).

Tolerances (SCALED_TOLERANCE): fp32 to round-off; fp16/bf16 to about two units in the last place,
since the kernel and torch round the same fp32 values but may accumulate the row sums in another order.
"""

import pytest
import torch

from tests.kernels.helpers import DEVICE, SCALED_TOLERANCE, assert_scaled_close, needs_triton

needs_triton()

from kiln.kernels.norms import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def RMS(x, w):  # noqa: N802
    return rms_norm(x, w, 1e-5)


def RMS_REFERENCE(x, w):  # noqa: N802
    return rms_norm_reference(x, w, 1e-5)


def _inputs(shape, dtype, weight_dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * 2 + 0.5).to(DEVICE, dtype).requires_grad_()
    weight = (1 + 0.3 * torch.randn(shape[-1], generator=generator)).to(DEVICE, weight_dtype).requires_grad_()
    bias = (0.2 * torch.randn(shape[-1], generator=generator)).to(DEVICE, weight_dtype).requires_grad_()
    grad = torch.randn(shape, generator=generator).to(DEVICE)
    return x, weight, bias, grad


def _compare(fn, reference, inputs, grad, tolerance):
    got_out = fn(*inputs)
    expected_out = reference(*inputs)
    assert got_out.dtype == expected_out.dtype
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    got = [got_out, *torch.autograd.grad(got_out, tensors, grad.to(got_out.dtype))]
    expected = [expected_out, *torch.autograd.grad(expected_out, tensors, grad.to(expected_out.dtype))]
    for name, g, e in zip(["out", "dx", "dweight", "dbias"], got, expected, strict=False):
        assert_scaled_close(g, e, tolerance, name)


# rows x hidden: one row, 17 rows, batched (B, T, H); hidden sizes 8, 40 (padded to 64), 1000
SHAPES = [(1, 8), (17, 40), (3, 5, 1000)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm(shape, dtype):
    x, weight, _, grad = _inputs(shape, dtype, dtype)
    _compare(RMS, RMS_REFERENCE, (x, weight), grad, SCALED_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm(shape, dtype):
    x, weight, bias, grad = _inputs(shape, dtype, dtype)
    _compare(lambda x, w, b: layer_norm(x, w, b, 1e-5), lambda x, w, b: layer_norm_reference(x, w, b, 1e-5),
             (x, weight, bias), grad, SCALED_TOLERANCE[dtype])  # fmt: skip


def test_layer_norm_without_bias():
    x, weight, _, grad = _inputs((6, 24), torch.float32, torch.float32)
    _compare(lambda x, w: layer_norm(x, w, None, 1e-5), lambda x, w: layer_norm_reference(x, w, None, 1e-5),
             (x, weight), grad, SCALED_TOLERANCE[torch.float32])  # fmt: skip


def test_rms_norm_half_input_fp32_weight_gives_fp32_like_the_module():
    """Under autocast the model's norms see bf16 activations and fp32 weights: output is fp32."""
    x, weight, _, grad = _inputs((9, 40), torch.bfloat16, torch.float32)
    _compare(RMS, RMS_REFERENCE, (x, weight), grad, SCALED_TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_modules_under_autocast_give_the_torch_dtype(norm):
    """bf16 activations, fp32 weights, autocast: the Triton path returns what the torch path returns."""
    import kiln
    from kiln.models.layers import make_norm

    config = kiln.preset("tiny", norm=norm, hidden_size=40, num_heads=4)
    torch_norm, triton_norm = make_norm(config, "torch").to(DEVICE), make_norm(config, "triton").to(DEVICE)
    x = torch.randn(2, 7, 40, device=DEVICE).to(torch.bfloat16)  # an autocast matmul's output
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        expected, got = torch_norm(x), triton_norm(x)
    assert got.dtype == expected.dtype
    assert_scaled_close(got, expected, SCALED_TOLERANCE[torch.bfloat16])


def test_non_contiguous_rows():
    base = torch.randn(6, 80, device=DEVICE)
    x = base[:, :40].requires_grad_()  # rows strided by 80
    weight = torch.rand(40, device=DEVICE).requires_grad_()
    _compare(lambda x, w: rms_norm(x, w, 1e-5), lambda x, w: rms_norm_reference(x, w, 1e-5), (x, weight),
             torch.randn(6, 40, device=DEVICE), SCALED_TOLERANCE[torch.float32])  # fmt: skip


def test_many_small_tiles(monkeypatch):
    """Two rows per tile: the backward's loop over tiles and the partial dW/dB sums across programs."""
    from kiln.kernels import norms

    monkeypatch.setattr(norms, "_tile", lambda cols: (norms.triton.next_power_of_2(cols), 2, 1))
    x, weight, bias, grad = _inputs((23, 40), torch.float32, torch.float32)
    _compare(lambda x, w, b: layer_norm(x, w, b, 1e-5), lambda x, w, b: layer_norm_reference(x, w, b, 1e-5),
             (x, weight, bias), grad, SCALED_TOLERANCE[torch.float32])  # fmt: skip
    _compare(RMS, RMS_REFERENCE, (x, weight), grad, SCALED_TOLERANCE[torch.float32])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(8, 4096, 4096), (16384, 1000), (3, 333, 8192)], ids=str)
def test_full_size_on_gpu(shape, dtype):
    x, weight, bias, grad = _inputs(shape, dtype, dtype)
    _compare(RMS, RMS_REFERENCE, (x, weight), grad, SCALED_TOLERANCE[dtype])
    _compare(lambda x, w, b: layer_norm(x, w, b, 1e-5), lambda x, w, b: layer_norm_reference(x, w, b, 1e-5),
             (x, weight, bias), grad, SCALED_TOLERANCE[dtype])  # fmt: skip
