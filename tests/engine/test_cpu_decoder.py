"""Whole decoder layers in one C++ call (kiln/engine/cpu_decoder.py): on a decode-only step the engine runs
each Llama-style layer as kiln::decoder_layer, and it gives exactly what the block's Python forward gives
(greedy tokens and their logprobs bit for bit, fp32 and bf16), for Llama (GQA, MQA, biases), Mistral's
sliding window and Qwen2. Families with other layers (GPT-2, BLOOM) and blocks whose linears were replaced
keep the Python forward.
"""

import pytest
import torch
from torch import nn

from kiln.kernels.cpu_extension import cpu_ops_available

if not cpu_ops_available():
    pytest.skip(
        "kiln's C++ CPU ops could not be built here (no C++ compiler, OpenMP or ninja)",
        allow_module_level=True,
    )

import kiln.engine.cpu_decoder as cpu_decoder  # noqa: E402
from kiln.engine import LLM, SamplingParams  # noqa: E402
from tests.engine.conftest import random_prompts  # noqa: E402
from tests.hf_cases import build_hf_model  # noqa: E402

PROMPT_LENGTHS = [1, 5, 9, 17, 30]
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)


@pytest.fixture
def op_calls(monkeypatch):
    """Rows a layer op took, one entry per layer run in C++ (a kiln::decoder_layers call adds one per layer);
    `op_calls.stacked` counts the decoder_layers calls."""
    calls = OpCalls()
    real, real_stack = cpu_decoder.decoder_layer, cpu_decoder.decoder_layers

    def spy(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    def spy_stack(x, stack, *args, **kwargs):
        calls.extend([x.shape[0]] * len(stack.layers))
        calls.stacked += 1
        return real_stack(x, stack, *args, **kwargs)

    monkeypatch.setattr(cpu_decoder, "decoder_layer", spy)
    monkeypatch.setattr(cpu_decoder, "decoder_layers", spy_stack)
    return calls


class OpCalls(list):
    stacked = 0


def generate(llm, prompts):
    outputs = llm.generate(prompts, PARAMS)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outputs]


def remove_layers(llm) -> None:
    llm.engine.model.__dict__.pop("run_layers", None)
    for block in llm.engine.model.layers:
        block.__dict__.pop("forward", None)


@pytest.mark.parametrize(
    "case", ["llama-gqa3-untied", "llama-mha-bias-tied", "llama-mqa-llama3-rope", "mistral-gqa4-window",
             "qwen2-gqa2-tied"],
)  # fmt: skip
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layers_in_cpp_equal_the_python_forward(case, dtype, tmp_path, op_calls):
    build_hf_model(case, tmp_path)
    prompts = random_prompts(PROMPT_LENGTHS, seed=3)
    # No prefix caching: the second run must compute its prompts as the first did.
    llm = LLM(tmp_path, dtype=dtype, block_size=4, enable_prefix_caching=False, verbose=False)
    num_layers = llm.engine.model.config.num_layers
    assert llm.engine.num_cpu_layers == num_layers
    assert f"{num_layers} decode layers in one C++ call a step" in llm.engine.startup_summary()
    fused = generate(llm, prompts)
    assert len(op_calls) >= num_layers * (PARAMS.max_tokens - 1), "the decode steps did not take the op"
    assert max(op_calls) == len(prompts)  # a step of all five decodes ran as one call per layer
    assert op_calls.stacked >= PARAMS.max_tokens - 1  # each decode step's layers in one call
    llm.engine.model.__dict__.pop("run_layers")  # the layers one op call each: the same bits
    assert generate(llm, prompts) == fused
    remove_layers(llm)
    op_calls.clear()
    assert generate(llm, prompts) == fused
    assert not op_calls


@pytest.mark.parametrize("case", ["gpt2-heads3-tied", "bloom-heads3"])
def test_other_families_keep_the_python_forward(case, tmp_path, op_calls):
    build_hf_model(case, tmp_path)
    llm = LLM(tmp_path, verbose=False)
    assert llm.engine.num_cpu_layers == 0
    generate(llm, random_prompts([4, 7], seed=1))
    assert not op_calls


class ScaledLinear(nn.Linear):
    """A Linear subclass (as a quantized or adapter layer would be) whose forward differs from F.linear."""

    def forward(self, x):
        return super().forward(x) * 0.5


def test_a_replaced_linear_is_seen_and_its_layer_runs_in_python(tmp_path, op_calls):
    build_hf_model("llama-gqa3-untied", tmp_path)
    prompts = random_prompts([6, 11], seed=4)
    llm = LLM(tmp_path, block_size=4, enable_prefix_caching=False, verbose=False)
    generate(llm, prompts)  # the op has run (and cached its weights) for every layer
    attn = llm.engine.model.layers[0].attn
    replaced = ScaledLinear(attn.q_proj.in_features, attn.q_proj.out_features, bias=False)
    with torch.no_grad():
        replaced.weight.copy_(attn.q_proj.weight)
    attn.q_proj = replaced
    op_calls.clear()
    with_replacement = generate(llm, prompts)
    num_layers = llm.engine.model.config.num_layers
    assert op_calls and len(op_calls) % (num_layers - 1) == 0  # every layer but the first
    remove_layers(llm)
    assert generate(llm, prompts) == with_replacement


def test_later_decode_steps_reuse_the_layers_until_a_weight_is_replaced(tmp_path, op_calls, monkeypatch):
    """After one decode step has found every layer, the next ones skip the per-block lookups; a parameter
    replaced on a module (a new tensor object, the module itself kept) is still seen by the next step."""
    build_hf_model("llama-gqa3-untied", tmp_path)
    prompts = random_prompts([6, 11], seed=4)
    llm = LLM(tmp_path, block_size=4, enable_prefix_caching=False, verbose=False)
    num_layers = llm.engine.model.config.num_layers
    lookups = []
    real = cpu_decoder.CpuDecoderForward._layer_for

    def counted(self, block, x):
        lookups.append(x.shape)
        return real(self, block, x)

    monkeypatch.setattr(cpu_decoder.CpuDecoderForward, "_layer_for", counted)
    generate(llm, prompts)
    assert op_calls.stacked >= PARAMS.max_tokens - 1
    # the prompt step and the first decode step look every block up; the other ten decode steps do not
    assert len(lookups) <= 2 * num_layers
    q_proj = llm.engine.model.layers[1].attn.q_proj
    q_proj.weight = nn.Parameter(q_proj.weight.detach() * 0.5)
    op_calls.clear()
    replaced = generate(llm, prompts)
    assert op_calls.stacked >= PARAMS.max_tokens - 1  # still one call a step, with the new weight
    remove_layers(llm)
    assert generate(llm, prompts) == replaced


def _quantized_llm(directory, dtype: str, scheme: str):
    """A 2-layer random Llama saved to `directory`, loaded quantized under `scheme`: (llm, its config)."""
    from kiln.config import ModelConfig
    from kiln.models.hf.io import save_model
    from kiln.models.transformer import Transformer

    config = ModelConfig(
        vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
        max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    save_model(Transformer(config), directory)
    llm = LLM(
        directory, dtype=dtype, quantization=scheme, block_size=4, enable_prefix_caching=False, verbose=False
    )
    assert llm.engine.num_cpu_layers == config.num_layers
    return llm, config


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weight_only_quantized_layers_run_in_cpp(scheme, dtype, tmp_path, op_calls, monkeypatch):
    """kiln.LLM(quantization=int8|int4): decode steps of up to MAX_OP_ROWS rows run each layer as the op
    (its projections on kiln::quant_linear, as QuantizedLinear's forward), bit for bit the Python forward;
    a step of more rows keeps the Python forward."""
    from kiln.quant.linear import MAX_OP_ROWS

    for key in MAX_OP_ROWS:  # AVX2 CPUs give bf16 every row count: test the rule at 16
        monkeypatch.setitem(MAX_OP_ROWS, key, 16)
    llm, config = _quantized_llm(tmp_path, dtype, scheme)
    prompts = random_prompts(PROMPT_LENGTHS, vocab_size=config.vocab_size, seed=3)
    fused = generate(llm, prompts)
    assert len(op_calls) >= config.num_layers * (PARAMS.max_tokens - 1)
    many = random_prompts([3] * (16 + 2), vocab_size=config.vocab_size, seed=5)
    op_calls.clear()
    fused_many = generate(llm, many)
    assert not op_calls  # every step held 18 decodes: more rows than the quantized op takes
    remove_layers(llm)
    op_calls.clear()
    assert generate(llm, prompts) == fused
    assert generate(llm, many) == fused_many
    assert not op_calls


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_w8a8_layers_run_in_cpp(dtype, tmp_path, op_calls):
    """kiln.LLM(quantization=w8a8): every decode step runs each layer as the op (its projections on
    kiln::w8a8_linear as QuantizedLinear calls it, the packed int8 GEMM above its rows where this CPU packs),
    bit for bit the Python forward, at 5 and at 18 decodes a step."""
    llm, config = _quantized_llm(tmp_path, dtype, "w8a8")
    prompts = random_prompts(PROMPT_LENGTHS, vocab_size=config.vocab_size, seed=3)
    many = random_prompts([3] * (16 + 2), vocab_size=config.vocab_size, seed=5)
    fused, fused_many = generate(llm, prompts), generate(llm, many)
    assert max(op_calls) == len(many) and len(op_calls) >= config.num_layers * (PARAMS.max_tokens - 1)
    remove_layers(llm)
    op_calls.clear()
    assert generate(llm, prompts) == fused
    assert generate(llm, many) == fused_many
    assert not op_calls


def test_packing_is_skipped_where_memory_is_short(tmp_path, monkeypatch):
    """The oneDNN-packed copies of bf16 linears (the weights' bytes once more) are made only where they leave
    PACKING_HEADROOM_BYTES free beside the KV cache; without them the engine says so and gives the same
    tokens (the packed GEMM equals F.linear bit for bit)."""
    import kiln.engine.engine as engine_module
    from kiln.kernels import cpu_linear
    from kiln.kernels.packed_weight import packed_rows

    if not packed_rows(torch.bfloat16):
        pytest.skip("bf16 linears are not packed on this CPU (no AMX or AVX512-BF16)")
    build_hf_model("llama-gqa3-untied", tmp_path)
    prompts = random_prompts(PROMPT_LENGTHS, seed=3)
    options = dict(dtype="bfloat16", block_size=4, enable_prefix_caching=False, verbose=False)
    packed = LLM(tmp_path, **options)
    assert packed.engine.packed_bytes > 0 and "also packed for oneDNN" in packed.engine.startup_summary()
    monkeypatch.setattr(engine_module, "packing_budget", lambda kv_cache_bytes: 0)
    # Unpacked weights take kiln's op for more rows (cpu_linear.UNPACKED_MAX_ROWS), whose sums round
    # differently; with the same limit the two engines differ only in packed GEMM vs F.linear (same bits).
    monkeypatch.setattr(cpu_linear, "UNPACKED_MAX_ROWS", dict(cpu_linear.MAX_ROWS))
    unpacked = LLM(tmp_path, **options)
    summary = unpacked.engine.startup_summary()
    assert unpacked.engine.packed_bytes == 0 and unpacked.engine.unpacked_bytes == packed.engine.packed_bytes
    assert "not packed for oneDNN" in summary and "1GiB of memory free" in summary
    assert generate(unpacked, prompts) == generate(packed, prompts)
