"""The engine on CUDA gives the CPU engine's greedy outputs (runs where a GPU is lent)."""

import pytest

from kiln.engine import LLM, SamplingParams
from tests.engine.conftest import random_prompts

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    "case", ["llama-gqa3-untied", "mistral-gqa4-window", "bloom-heads3", "gpt2-heads3-tied"]
)
def test_cuda_engine_matches_cpu(case, hf_model_dir):
    directory = hf_model_dir(case)
    prompts = random_prompts([1, 5, 17, 40, 33, 8], seed=13)
    params = [SamplingParams(temperature=0, max_tokens=16)] * 5 + [
        SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=16, logprobs=2)
    ]
    cpu = LLM(directory, device="cpu", block_size=4, verbose=False).generate(prompts, params)
    gpu = LLM(directory, device="cuda", dtype="float32", block_size=4, verbose=False).generate(
        prompts, params
    )
    assert [o.outputs[0].token_ids for o in gpu[:5]] == [o.outputs[0].token_ids for o in cpu[:5]]
    assert len(gpu[5].outputs[0].token_ids) == 16 and len(gpu[5].outputs[0].logprobs) == 16
