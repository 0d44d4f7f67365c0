"""EngineConfig.kernels end to end: the engine builds its paged attention backend and sets the model's
fused ops from it, and the Triton path (Triton's CPU interpreter without a GPU, see tests/conftest.py)
generates the torch path's greedy tokens."""

import pytest
import torch

from kiln.engine import LLM, EngineConfig, SamplingParams
from kiln.engine.attention import TorchPagedAttention
from kiln.errors import KilnError
from tests.engine.conftest import random_prompts


def test_torch_kernels_use_the_torch_backend(hf_model_dir):
    llm = LLM(hf_model_dir("llama-gqa3-untied"), kernels="torch", verbose=False)
    assert llm.engine.runner.attention is TorchPagedAttention
    assert llm.engine.model.kernels == "torch"


def test_auto_on_cpu_is_the_cpp_op_when_built_and_torch_code_in_the_model(hf_model_dir):
    from kiln.engine.cpu_attention import CppPagedAttention
    from kiln.kernels.cpu_extension import cpu_ops_available

    llm = LLM(hf_model_dir("llama-gqa3-untied"), device="cpu", verbose=False)
    expected = CppPagedAttention if cpu_ops_available() else TorchPagedAttention
    assert llm.engine.config.kernels == "auto" and llm.engine.runner.attention is expected
    assert llm.engine.model.kernels == "auto"  # no Triton off CUDA: the torch code runs


def test_unknown_kernels_are_refused():
    with pytest.raises(KilnError, match="kernels must be one of torch, triton, auto"):
        EngineConfig(kernels="cuda")


@pytest.mark.parametrize("case", ["llama-gqa3-untied", "bloom-heads3"])
def test_triton_kernels_give_the_torch_greedy_tokens(hf_model_dir, case):
    pytest.importorskip("triton")
    from kiln.engine.attention import TritonPagedAttention

    directory = hf_model_dir(case)
    prompts = random_prompts([3, 11, 30, 7], seed=4)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = {}
    for kernels in ("torch", "triton"):
        llm = LLM(directory, kernels=kernels, device=device, block_size=4, max_num_batched_tokens=32,
                  verbose=False)  # fmt: skip
        runs[kernels] = [output.outputs[0].token_ids for output in llm.generate(prompts, params)]
    assert llm.engine.runner.attention is TritonPagedAttention and llm.engine.model.kernels == "triton"
    assert runs["triton"] == runs["torch"]
