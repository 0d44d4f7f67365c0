"""Flash attention (Triton) against its torch reference: outputs and dq, dk, dv, across dtypes and odd shapes.

Tolerances: fp32 agrees to round-off (SCALED_TOLERANCE). For fp16/bf16, as flash-attn's own tests do,
the kernel's error against the fp32 reference may be at most twice that of the same math run by torch in
the low precision (plus 1e-3 of the reference's scale).
"""

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.helpers import DEVICE, SCALED_TOLERANCE, assert_scaled_close, max_error, needs_triton

needs_triton()

from kiln.kernels import flash_attention_common as common  # noqa: E402
from kiln.kernels.flash_attention import attention_flops, attention_reference, flash_attention  # noqa: E402


def _inputs(batch, heads, kv_heads, seq_q, seq_k, head_dim, dtype, seed=0, token_major=True):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, heads, head_dim, generator=generator)
    # the model's layout: (B, T, H, D) memory seen as (B, H, T, D)
    q = q.transpose(1, 2) if token_major else q.transpose(1, 2).contiguous()
    k = torch.randn(batch, kv_heads, seq_k, head_dim, generator=generator)
    v = torch.randn(batch, kv_heads, seq_k, head_dim, generator=generator)
    return [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]


def _low_precision_reference(q, k, v, causal, alibi_slopes, cu_seqlens):
    """The reference's math, but in the inputs' dtype throughout (no fp32 upcast)."""
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        parts = []
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            sub = (x[start:end].transpose(0, 1)[None] for x in (q, k, v))
            parts.append(_low_precision_reference(*sub, causal, alibi_slopes, None)[0].transpose(0, 1))
        return torch.cat(parts)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    num_queries, num_keys = q.shape[2], k.shape[2]
    query_positions = torch.arange(num_queries, device=q.device)[:, None] + num_keys - num_queries
    key_positions = torch.arange(num_keys, device=q.device)[None, :]
    if alibi_slopes is not None:
        bias = alibi_slopes[:, None, None] * (key_positions - query_positions)
        scores = scores + bias.to(q.dtype)
    if causal:
        scores = scores.masked_fill(key_positions > query_positions, float("-inf"))
    return scores.softmax(-1) @ v


def _check(q, k, v, *, causal, alibi_slopes=None, cu_seqlens=None):
    generator = torch.Generator().manual_seed(1)
    out = flash_attention(q, k, v, causal=causal, alibi_slopes=alibi_slopes, cu_seqlens=cu_seqlens)
    grad_out = torch.randn(out.shape, generator=generator).to(out)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad_out)]
    ref = attention_reference(q, k, v, causal=causal, alibi_slopes=alibi_slopes, cu_seqlens=cu_seqlens)
    expected = [ref, *torch.autograd.grad(ref, (q, k, v), grad_out)]
    assert out.dtype == q.dtype and out.shape == q.shape
    names = ("out", "dq", "dk", "dv")
    if q.dtype == torch.float32:
        for name, g, e in zip(names, got, expected, strict=True):
            assert_scaled_close(g, e, SCALED_TOLERANCE[torch.float32], name)
        return
    low = _low_precision_reference(q, k, v, causal, alibi_slopes, cu_seqlens)
    baseline = [low, *torch.autograd.grad(low, (q, k, v), grad_out)]
    for name, g, e, b in zip(names, got, expected, baseline, strict=True):
        allowed = 2 * max_error(b, e) + 1e-3 * max(1.0, e.float().abs().max().item())
        assert max_error(g, e) <= allowed, f"{name}: {max_error(g, e):.3g} > {allowed:.3g}"


# (batch, heads, kv_heads, seq_q, seq_k, head_dim): sequences 1, 17, 40, 64; head counts 1, 3, 12;
# GQA ratios 1, 4, 8; head dims 16, 64 and 40 (padded to 64).
SHAPES = [
    (2, 1, 1, 17, 17, 16),
    (1, 3, 3, 1, 1, 16),
    (1, 12, 3, 40, 40, 40),
    (2, 8, 1, 17, 17, 64),
    (1, 4, 1, 64, 64, 16),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_matches_reference_fp32(shape, causal):
    _check(*_inputs(*shape, torch.float32), causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[3]], ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_half(shape, dtype):
    _check(*_inputs(*shape, dtype), causal=True)


@pytest.mark.parametrize("blocks", [(16, 16), (16, 32), (32, 16)], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_many_small_blocks(blocks, causal, monkeypatch):
    """Tiles smaller than the sequence: the unmasked/diagonal split and the backward loops' bounds."""
    monkeypatch.setitem(common.INTERPRETED_BLOCKS, "BLOCK_M", blocks[0])
    monkeypatch.setitem(common.INTERPRETED_BLOCKS, "BLOCK_N", blocks[1])
    _check(*_inputs(1, 4, 2, 45, 45, 16, torch.float32), causal=causal)


def test_fewer_queries_than_keys_aligns_causality_bottom_right():
    _check(*_inputs(2, 4, 2, 5, 23, 16, torch.float32), causal=True)
    _check(*_inputs(1, 2, 1, 33, 40, 16, torch.float32), causal=False)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_alibi(causal):
    from kiln.models.layers import alibi_slopes

    q, k, v = _inputs(1, 6, 2, 33, 33, 16, torch.float32)
    _check(q, k, v, causal=causal, alibi_slopes=alibi_slopes(6).to(DEVICE))


def test_alibi_matches_the_models_bloom_bias():
    """The kernel's slope * (key - query) equals BLOOM's slope * key after softmax."""
    from kiln.models.layers import alibi_slopes

    q, k, v = _inputs(1, 4, 4, 19, 19, 16, torch.float32)
    slopes = alibi_slopes(4).to(DEVICE)
    key_positions = torch.arange(19, device=DEVICE)
    bias = slopes[:, None, None] * key_positions.float()  # (H, 1, S)
    causal = torch.ones(19, 19, dtype=torch.bool, device=DEVICE).tril()
    bias = bias.masked_fill(~causal, float("-inf"))[None]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    got = flash_attention(q, k, v, causal=True, alibi_slopes=slopes)
    assert_scaled_close(got, expected, 2e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_packed_variable_length_sequences(causal, kv_heads):
    lengths = [5, 1, 40, 17]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    generator = torch.Generator().manual_seed(3)
    q, k, v = (
        torch.randn(sum(lengths), h, 16, generator=generator).to(DEVICE).requires_grad_()
        for h in (4, kv_heads, kv_heads)
    )
    _check(q, k, v, causal=causal, cu_seqlens=cu_seqlens)


def test_packed_equals_padded_batch():
    """Padding-free training: packing two sequences equals running each alone."""
    q, k, v = _inputs(2, 4, 2, 24, 24, 16, torch.float32, token_major=False)
    packed = [x.detach().transpose(1, 2).reshape(48, x.shape[1], 16) for x in (q, k, v)]
    cu_seqlens = torch.tensor([0, 24, 48], device=DEVICE)
    out = flash_attention(*packed, causal=True, cu_seqlens=cu_seqlens, max_seqlen=24)
    expected = flash_attention(q, k, v, causal=True).detach().transpose(1, 2).reshape(48, 4, 16)
    torch.testing.assert_close(out, expected)


def test_sequence_1000():
    """A long odd length (1000 % 128 != 0) with large tiles, so the interpreter takes seconds."""
    blocks = {"BLOCK_M": 128, "BLOCK_N": 128}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in blocks.items():
            patch.setitem(common.INTERPRETED_BLOCKS, key, value)
        _check(*_inputs(1, 2, 1, 1000, 1000, 16, torch.float32), causal=True)


def test_autocast_casts_inputs_like_sdpa():
    q, k, v = _inputs(1, 2, 2, 9, 9, 16, torch.float32)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = flash_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32


def test_refuses_what_it_cannot_compute():
    from kiln.errors import KilnError

    q, k, v = _inputs(1, 2, 2, 9, 4, 16, torch.float32)
    with pytest.raises(KilnError, match="queries <= keys"):
        flash_attention(q, k, v, causal=True)
    q, k, v = _inputs(1, 1, 1, 2, 2, 264, torch.float32)
    with pytest.raises(KilnError, match="head dims up to 256"):
        flash_attention(q, k, v)


def test_flop_count():
    assert attention_flops(1, 1, 4, 4, 8, causal=False) == 4 * 4 * 4 * 8
    assert attention_flops(2, 3, 8, 8, 8, causal=True) == 2 * 3 * 8 * 8 * 8 * 2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(
    "shape",
    [
        (2, 16, 16, 1024, 1024, 128),
        (1, 32, 4, 2048, 2048, 128),
        (4, 12, 12, 1000, 1000, 64),
        (2, 8, 1, 333, 333, 80),
    ],
    ids=lambda s: "x".join(map(str, s)),
)
def test_full_size_on_gpu(shape, causal, dtype):
    _check(*_inputs(*shape, dtype), causal=causal)


@pytest.mark.gpu
def test_varlen_and_alibi_on_gpu():
    from kiln.models.layers import alibi_slopes

    lengths = [1, 700, 2048, 333]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    q, k, v = (
        torch.randn(sum(lengths), h, 128, device=DEVICE, dtype=torch.bfloat16).requires_grad_()
        for h in (16, 4, 4)
    )
    _check(q, k, v, causal=True, cu_seqlens=cu_seqlens, alibi_slopes=alibi_slopes(16).to(DEVICE))
