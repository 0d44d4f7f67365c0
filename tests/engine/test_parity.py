"""The engine's greedy outputs equal transformers' generate, token for token, for every family.

16 prompts of mixed lengths go in together; KV blocks of 4 tokens put block boundaries mid-prompt, and a
64-token step budget forces chunked prefills that share steps with decodes.
"""

import pytest
import torch

from kiln.engine import LLM, SamplingParams
from kiln.generation import left_pad
from tests.engine.conftest import random_prompts
from tests.hf_cases import CASE_NAMES, build_hf_model

PROMPT_LENGTHS = [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 23, 31, 32, 33, 40]
MAX_TOKENS = 16


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy generate over one left-padded batch."""
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
        )
    return out[:, ids.shape[1] :].tolist()


@pytest.mark.parametrize("case", CASE_NAMES)
def test_greedy_batch_matches_transformers(case, tmp_path):
    hf = build_hf_model(case, tmp_path)
    prompts = random_prompts(PROMPT_LENGTHS, seed=1)
    expected = hf_greedy(hf, prompts, MAX_TOKENS)
    llm = LLM(tmp_path, block_size=4, max_num_batched_tokens=64, verbose=False)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    assert [output.outputs[0].token_ids for output in outputs] == expected
    assert all(output.finished and output.outputs[0].finish_reason == "length" for output in outputs)
    assert llm.engine.counters.num_prompt_tokens_computed == sum(PROMPT_LENGTHS)
    assert llm.engine.kv_usage == 0  # every block is released


def test_startup_line_shows_total_and_active_parameters_of_an_moe_model(tmp_path):
    build_hf_model("mixtral-e8-top2-mqa", tmp_path)
    llm = LLM(tmp_path, verbose=False)
    config = llm.engine.model.config
    total, active = config.num_parameters(), config.num_active_parameters()
    assert active < total
    assert f"model: {total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token" in (
        llm.engine.startup_summary()
    )
