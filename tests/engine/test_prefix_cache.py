"""Prefix caching: shared prompt prefixes are computed once, and outputs do not change."""

import pytest

from kiln.engine import LLM, SamplingParams
from tests.engine.conftest import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=8)


def test_shared_200_token_prefix_computes_only_the_new_tokens(text_model_dir):
    prefix, first_tail, second_tail = random_prompts([200, 10, 13], seed=5, vocab_size=400)
    llm = LLM(text_model_dir, block_size=8, verbose=False)
    counters = llm.engine.counters
    llm.generate([prefix + first_tail], GREEDY)
    assert (counters.num_prompt_tokens_computed, counters.num_prefix_cache_hit_tokens) == (210, 0)
    second = llm.generate([prefix + second_tail], GREEDY)[0]
    assert counters.num_prompt_tokens_computed == 210 + 13
    assert counters.num_prefix_cache_hit_tokens == 200 and second.num_cached_tokens == 200
    uncached = LLM(text_model_dir, block_size=8, enable_prefix_caching=False, verbose=False)
    assert (
        second.outputs[0].token_ids
        == uncached.generate([prefix + second_tail], GREEDY)[0].outputs[0].token_ids
    )


def test_a_repeated_prompt_recomputes_only_its_last_block(text_model_dir):
    (prompt,) = random_prompts([32], seed=6, vocab_size=400)
    llm = LLM(text_model_dir, block_size=8, verbose=False)
    first = llm.generate([prompt], GREEDY)[0]
    again = llm.generate([prompt], GREEDY)[0]
    # All 4 blocks are cached, but the last token must be computed to get its logits: its block is redone.
    assert llm.engine.counters.num_prompt_tokens_computed == 32 + 8
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_n_samples_share_the_prompt(text_model_dir):
    (prompt,) = random_prompts([43], seed=7, vocab_size=400)
    llm = LLM(text_model_dir, block_size=8, verbose=False)
    output = llm.generate([prompt], SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=10))[0]
    # Sample 0 computes the prompt; the other three find its 5 full blocks cached and compute 3 tokens each.
    assert llm.engine.counters.num_prompt_tokens_computed == 43 + 3 * 3
    samples = [completion.token_ids for completion in output.outputs]
    assert [completion.index for completion in output.outputs] == [0, 1, 2, 3]
    assert len({tuple(sample) for sample in samples}) == 4
    again = LLM(text_model_dir, block_size=8, verbose=False).generate(
        [prompt], SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=10)
    )[0]
    assert [completion.token_ids for completion in again.outputs] == samples


def test_prompt_logprobs_bypass_the_cache(text_model_dir):
    (prompt,) = random_prompts([24], seed=8, vocab_size=400)
    llm = LLM(text_model_dir, block_size=8, verbose=False)
    llm.generate([prompt], GREEDY)
    output = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1))[0]
    assert len(output.prompt_logprobs) == 24 and output.prompt_logprobs[0] is None
    assert llm.engine.counters.num_prompt_tokens_computed == 48


@pytest.mark.parametrize("case", ["bloom-heads3", "mistral-gqa4-window", "gpt2-heads4-untied"])
def test_prefix_hits_change_nothing_with_alibi_windows_or_learned_positions(case, hf_model_dir):
    directory = hf_model_dir(case)
    (prefix,) = random_prompts([24], seed=14)
    prompts = [prefix + tail for tail in random_prompts([1, 6, 13], seed=15)]
    llm = LLM(directory, block_size=4, verbose=False)
    llm.generate(prompts[:1], GREEDY)
    cached = llm.generate(prompts, GREEDY)
    assert llm.engine.counters.num_prefix_cache_hit_tokens >= 3 * 24
    uncached = LLM(directory, block_size=4, enable_prefix_caching=False, verbose=False).generate(
        prompts, GREEDY
    )
    assert [o.outputs[0].token_ids for o in cached] == [o.outputs[0].token_ids for o in uncached]
