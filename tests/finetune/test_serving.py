"""Serving adapters from one base: a batch mixing two LoRAs, a prompt-tuning adapter and the base gives
each request exactly (greedy) what its adapter gives alone; the prefix cache keeps adapters apart."""

import pytest
import torch

import kiln
from kiln import SamplingParams
from kiln.errors import KilnError
from kiln.finetune import attach_adapter
from kiln.finetune.evaluation import greedy_completion
from tests.finetune.adapters import three_adapters
from tests.hf_cases import build_text_model

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    base = build_text_model(folder / "base")
    return base, three_adapters(base, folder)


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, 400, (int(n),), generator=generator).tolist()
        for n in torch.randint(3, 40, (count,), generator=generator)
    ]


def _alone(base, adapter_dir) -> torch.nn.Module:
    """The adapter alone, outside the engine: the plain model (no paged KV cache)."""
    model = kiln.load_model(base)
    return model if adapter_dir is None else attach_adapter(model, adapter_dir)


def test_mixed_batch_equals_each_adapter_alone(served):
    base, adapters = served
    llm = kiln.LLM(base, adapters=adapters, kv_cache_memory="16MB", verbose=False, max_num_seqs=32)
    names = [None, *adapters]
    prompts = _prompts(24)
    params = [
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, adapter=names[i % 4])
        for i in range(24)
    ]
    outputs = llm.generate(prompts, params)
    assert llm.engine.counters.num_steps < 24 * MAX_TOKENS / 4  # the requests did run together
    alone = {name: _alone(base, adapters.get(name)) for name in names}
    for i, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
        name = names[i % 4]
        expected = greedy_completion(alone[name], prompt, stop_ids=set(), max_new_tokens=MAX_TOKENS)
        assert output.outputs[0].token_ids == expected, (i, name)
        assert output.prompt_token_ids == prompt  # virtual tokens are not part of the reported prompt
    same_prompt = [
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, adapter=n) for n in names
    ]
    texts = [tuple(o.outputs[0].token_ids) for o in llm.generate([prompts[0]] * 4, same_prompt)]
    assert len(set(texts)) == 4  # every adapter changes the output of the same prompt


def test_prefix_cache_never_shares_blocks_across_adapters(served):
    base, adapters = served
    llm = kiln.LLM(base, adapters=adapters, kv_cache_memory="16MB", verbose=False)
    prompt = _prompts(1, seed=5)[0] * 3  # a few full blocks
    first = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    hits = llm.engine.counters.num_prefix_cache_hit_tokens
    lora = llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, adapter="lora-a")
    )[0]
    assert llm.engine.counters.num_prefix_cache_hit_tokens == hits  # no base blocks reused for the LoRA
    again = llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, adapter="lora-a")
    )[0]
    assert llm.engine.counters.num_prefix_cache_hit_tokens > hits  # its own blocks are reused
    assert again.outputs[0].token_ids == lora.outputs[0].token_ids != first.outputs[0].token_ids


def test_unknown_adapter_and_bad_adapters_are_one_line_errors(served, tmp_path):
    base, adapters = served
    llm = kiln.LLM(base, adapters={"soft": adapters["soft"]}, kv_cache_memory="16MB", verbose=False)
    with pytest.raises(KilnError, match="unknown adapter 'nope'; this engine serves adapters: soft"):
        llm.generate([1, 2, 3], SamplingParams(adapter="nope"))
    with pytest.raises(KilnError, match="prompt logprobs are not available"):
        llm.generate([1, 2, 3], SamplingParams(adapter="soft", prompt_logprobs=1))
    # penalties read the prompt's tokens: the virtual ones (past the vocabulary) are left out
    penalised = SamplingParams(adapter="soft", repetition_penalty=1.3, max_tokens=4, logprobs=2)
    assert len(llm.generate([1, 2, 3], penalised)[0].outputs[0].token_ids) == 4
    other = build_text_model(tmp_path / "other")  # same shape: accepted; another shape: refused
    from tests.hf_cases import build_hf_model

    build_hf_model("llama-gqa3-untied", tmp_path / "hf")
    with pytest.raises(KilnError, match="trained on another base model"):
        kiln.LLM(tmp_path / "hf", adapters={"a": adapters["lora-a"]}, kv_cache_memory="16MB", verbose=False)
    assert kiln.LLM(other, adapters={"a": adapters["lora-a"]}, kv_cache_memory="16MB", verbose=False)
