"""kiln's fused CPU ops (csrc/rms_norm.cpp, rope.cpp, swiglu.cpp) against the torch code they replace in
kiln/models/layers.py, the routing rule in kiln.kernels.cpu_fused, and the engine's greedy tokens.

Tolerances: fp32 to 1e-5 of the output's scale (the ops sum and multiply in another order). bf16: the ops
round where the torch code rounds, so SwiGLU and RoPE match it exactly and RMSNorm to one bf16 unit in the
last place (its fp32 sum runs in another order), like torch's own bf16 against itself.
"""

import pytest
import torch
import torch.nn.functional as F

from kiln.config import ModelConfig
from kiln.engine import LLM, SamplingParams
from kiln.kernels import cpu_fused
from kiln.kernels.cpu_extension import cpu_ops_available
from kiln.kernels.rope import apply_rope
from kiln.models.layers import MLP, Attention, AttentionInputs, RMSNorm
from tests.engine.conftest import random_prompts
from tests.hf_cases import build_hf_model

pytestmark = pytest.mark.skipif(
    not cpu_ops_available(), reason="kiln's C++ CPU ops did not build here (no compiler or OpenMP)"
)

DTYPES = [torch.float32, torch.bfloat16]
LEADING = [(1, 1), (1, 3), (2, 5), (7,)]  # (B, T) at decode, prefill and a batch; plain rows


def _randn(*shape, dtype, generator):
    return torch.randn(*shape, generator=generator).to(dtype)


def assert_matches(got: torch.Tensor, expected: torch.Tensor, ulps_bf16: int = 0) -> None:
    assert got.shape == expected.shape and got.dtype == expected.dtype
    scale = max(1.0, expected.abs().max().item())
    error = (got.double() - expected.double()).abs().max().item()
    if got.dtype == torch.float32:
        assert error <= 1e-5 * scale, (error, scale)
    elif ulps_bf16 == 0:
        assert torch.equal(got, expected), error
    else:
        # one bf16 unit in the last place of each element
        unit = 2.0 ** (torch.frexp(expected.double().abs())[1] - 8).double()
        assert ((got.double() - expected.double()).abs() <= ulps_bf16 * unit).all(), error


def torch_rms_norm(x, weight, eps):
    norm = RMSNorm(x.shape[-1], eps, kernels="torch").to(x.dtype)
    norm.weight.data.copy_(weight)
    with torch.no_grad():
        return norm(x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 17, 768, 1001])
@pytest.mark.parametrize("leading", LEADING)
def test_rms_norm_matches_the_torch_code(leading, dim, dtype):
    generator = torch.Generator().manual_seed(dim)
    x = _randn(*leading, dim, dtype=dtype, generator=generator) * 3
    weight = _randn(dim, dtype=dtype, generator=generator)
    for eps in (1e-6, 0.5):
        assert_matches(cpu_fused.rms_norm(x, weight, eps), torch_rms_norm(x, weight, eps), ulps_bf16=1)


def test_rms_norm_of_a_non_contiguous_input():
    x = torch.randn(4, 33, 6)[:, :, 1].contiguous().t()  # (33, 4) strided
    weight = torch.randn(4)
    assert_matches(cpu_fused.rms_norm(x, weight, 1e-5), torch_rms_norm(x, weight, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 33, 2048, 40_001])  # the last one splits across threads
@pytest.mark.parametrize("leading", LEADING)
def test_swiglu_matches_the_torch_code(leading, dim, dtype):
    generator = torch.Generator().manual_seed(dim)
    gate = _randn(*leading, dim, dtype=dtype, generator=generator) * 4
    up = _randn(*leading, dim, dtype=dtype, generator=generator)
    assert_matches(cpu_fused.swiglu(gate, up), F.silu(gate) * up)


def torch_rope(x, cos, sin, head_dim):
    """x (B, T, H * D) through layers.py's torch path: heads first, apply_rope, back to rows."""
    batch, length, _ = x.shape
    heads = x.view(batch, length, -1, head_dim).transpose(1, 2)
    return apply_rope(heads, cos, sin).transpose(1, 2).reshape(batch, length, -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(1, 1), (3, 1), (6, 2), (5, 5)])
@pytest.mark.parametrize("head_dim", [2, 18, 64])
@pytest.mark.parametrize("leading", [(1, 1), (1, 7), (3, 2)])
def test_rope_matches_the_torch_code(leading, head_dim, heads, dtype):
    generator = torch.Generator().manual_seed(head_dim)
    q = _randn(*leading, heads[0] * head_dim, dtype=dtype, generator=generator)
    k = _randn(*leading, heads[1] * head_dim, dtype=dtype, generator=generator)
    # independent halves: the op must read both halves of the tables, not assume they repeat
    cos = _randn(*leading, head_dim, dtype=dtype, generator=generator)
    sin = _randn(*leading, head_dim, dtype=dtype, generator=generator)
    q_out, k_out = cpu_fused.rope(q, k, cos, sin)
    assert_matches(q_out, torch_rope(q, cos, sin, head_dim))
    assert_matches(k_out, torch_rope(k, cos, sin, head_dim))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: torch.ops.kiln.rms_norm(torch.ones(2, 4), torch.ones(3), 1e-5), "weight must be"),
        (lambda: torch.ops.kiln.rms_norm(torch.ones(4), torch.ones(4).bfloat16(), 1e-5), "cast one"),
        (lambda: torch.ops.kiln.swiglu(torch.ones(3), torch.ones(4)), "one shape"),
        (lambda: torch.ops.kiln.swiglu(torch.ones(3).half(), torch.ones(3).half()), "float32 and bfloat16"),
        (
            lambda: torch.ops.kiln.rope(
                torch.ones(2, 8), torch.ones(2, 5), torch.ones(2, 4), torch.ones(2, 4)
            ),
            "k must be",
        ),  # fmt: skip
        (
            lambda: torch.ops.kiln.rope(
                torch.ones(2, 6), torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3)
            ),
            "D even",
        ),  # fmt: skip
    ],
)
def test_ops_say_what_is_wrong(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_ops_on_meta_tensors_give_shapes():
    meta = dict(device="meta")
    assert torch.ops.kiln.rms_norm(torch.empty(2, 5, **meta), torch.empty(5, **meta), 1e-5).shape == (2, 5)
    assert torch.ops.kiln.swiglu(torch.empty(3, 7, **meta), torch.empty(3, 7, **meta)).shape == (3, 7)
    q, k = torch.ops.kiln.rope(*(torch.empty(2, n, **meta) for n in (12, 4, 4, 4)))
    assert q.shape == (2, 12) and k.shape == (2, 4)


def test_routing_rule():
    x = torch.ones(2, 4)
    assert cpu_fused.fused_applies("auto", x, torch.ones(4))
    assert not cpu_fused.fused_applies("torch", x, torch.ones(4))  # the torch switch keeps the reference
    assert not cpu_fused.fused_applies("auto", x, torch.ones(4).bfloat16())  # mixed dtypes
    assert not cpu_fused.fused_applies("auto", x.half(), torch.ones(4).half())
    assert not cpu_fused.fused_applies("auto", x, torch.ones(4, requires_grad=True))  # needs a backward
    with torch.no_grad():
        assert cpu_fused.fused_applies("auto", x, torch.ones(4, requires_grad=True))
    table = torch.ones(1, 3, 4)
    assert cpu_fused.rope_applies("auto", torch.ones(1, 3, 8), torch.ones(1, 3, 4), table, table)
    broadcast = torch.ones(1, 1, 4)  # one table row for three tokens: left to the torch code
    assert not cpu_fused.rope_applies("auto", torch.ones(1, 3, 8), torch.ones(1, 3, 4), broadcast, broadcast)


@pytest.fixture
def op_calls(monkeypatch):
    """Counts each fused op's calls through the wrappers the models use."""
    calls = {"rms_norm": 0, "rope": 0, "swiglu": 0}
    for name in calls:
        original = getattr(cpu_fused, name)

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(cpu_fused, name, counted)
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
def test_layers_route_auto_and_keep_torch_as_reference(op_calls, dtype):
    config = ModelConfig(
        vocab_size=11, hidden_size=24, num_layers=1, num_heads=3, num_kv_heads=1, intermediate_size=40,
        mlp="gated", activation="silu", norm="rmsnorm", position="rope",
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    x = _randn(1, 3, 24, dtype=dtype, generator=generator)
    cos, sin = (_randn(1, 3, config.head_dim, dtype=dtype, generator=generator) for _ in range(2))
    outputs = {}
    for kernels in ("torch", "auto"):
        torch.manual_seed(1)
        norm, attn = RMSNorm(24, 1e-5, kernels).to(dtype), Attention(config, 0, kernels).to(dtype)
        mlp = MLP(config, kernels).to(dtype)
        inputs = AttentionInputs(mask=None, is_causal=True, cos=cos, sin=sin)
        with torch.no_grad():
            outputs[kernels] = mlp(attn(norm(x), inputs))
        if kernels == "torch":
            assert op_calls == {"rms_norm": 0, "rope": 0, "swiglu": 0}
    assert op_calls == {"rms_norm": 1, "rope": 1, "swiglu": 1}
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(outputs["auto"], outputs["torch"], **tolerance)


def test_training_keeps_the_torch_code(op_calls):
    norm = RMSNorm(8, 1e-5, kernels="auto")
    norm(torch.randn(2, 8)).sum().backward()  # the weight needs a gradient: no C++ op
    assert op_calls["rms_norm"] == 0 and norm.weight.grad is not None


@pytest.mark.parametrize("case, dtype", [("llama-gqa3-untied", "fp32"), ("qwen2-gqa2-tied", "bf16")])
def test_engine_greedy_tokens_are_unchanged(tmp_path, op_calls, monkeypatch, case, dtype):
    directory = tmp_path / case
    build_hf_model(case, directory)
    prompts = random_prompts([1, 5, 13, 30], seed=3)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    runs = {}
    for fused in (False, True):  # same engine (C++ linears and attention both times), fused ops off / on
        monkeypatch.setattr(cpu_fused, "_op_built", lambda fused=fused: fused)
        llm = LLM(directory, dtype=dtype, block_size=4, verbose=False)
        runs[fused] = [output.outputs[0].token_ids for output in llm.generate(prompts, params)]
        if not fused:
            assert op_calls == {"rms_norm": 0, "rope": 0, "swiglu": 0}
    assert min(op_calls.values()) > 0
    assert runs[True] == runs[False]
