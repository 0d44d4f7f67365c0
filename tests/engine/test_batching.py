"""Continuous batching changes nothing a request sees: alone or among 32, with or without preemption."""

import pytest

from kiln.engine import LLM, SamplingParams
from tests.engine.conftest import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.mark.parametrize(
    "case",
    [
        "llama-gqa3-untied",
        "bloom-heads3",
        "mistral-gqa4-window",
        "gpt2-heads3-tied",
        "mixtral-e8-top2-mqa",
        "qwen2moe-e3-top2-shared-tied",
        "qwen3moe-e8-top2-renorm-gqa2-dense1",
    ],
)
def test_greedy_alone_equals_in_a_batch_of_32(case, hf_model_dir):
    directory = hf_model_dir(case)
    prompts = random_prompts([1 + (7 * i) % 60 for i in range(32)], seed=2)
    llm = LLM(directory, block_size=4, max_num_batched_tokens=128, enable_prefix_caching=False, verbose=False)
    together = [output.outputs[0].token_ids for output in llm.generate(prompts, GREEDY)]
    alone = [llm.generate([prompt], GREEDY)[0].outputs[0].token_ids for prompt in prompts]
    assert together == alone


def test_seeded_sample_is_the_same_alone_and_in_company(text_model_dir):
    llm = LLM(text_model_dir, block_size=4, verbose=False)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=24)
    alone = llm.generate(["def main():"], seeded)[0].outputs[0]
    company = ["import os", "x = 1", "class A:", "for i in range(3):"] * 6
    company_params = [SamplingParams(temperature=1.0, max_tokens=24)] * 12 + [GREEDY] * 12
    together = llm.generate(
        ["x"] + company[:12] + ["def main():"] + company[12:],
        [GREEDY] + company_params[:12] + [seeded] + company_params[12:],
    )
    in_company = together[13].outputs[0]
    assert in_company.text == alone.text and in_company.token_ids == alone.token_ids
    assert len(alone.token_ids) > 5
    reseeded = llm.generate(
        ["def main():"], SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=99, max_tokens=24)
    )
    assert reseeded[0].outputs[0].token_ids != alone.token_ids


def test_preemption_finishes_all_64_requests_identically(hf_model_dir):
    directory = hf_model_dir("llama-gqa3-untied")
    prompts = random_prompts([5 + (11 * i) % 36 for i in range(64)], seed=3)
    params = [SamplingParams(temperature=0, max_tokens=8)] * 60 + [
        SamplingParams(temperature=1.0, seed=i, max_tokens=8) for i in range(4)
    ]
    roomy = LLM(directory, block_size=4, verbose=False).generate(prompts, params)
    # 32 blocks of 4 hold one full-length (128-token) sequence, far from the ~2,000 tokens all 64 need.
    llm = LLM(directory, block_size=4, num_kv_blocks=32, max_model_len=128, verbose=False)
    cramped = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in cramped] == [o.outputs[0].token_ids for o in roomy]
    assert all(o.outputs[0].finish_reason == "length" for o in cramped)
    counters = llm.engine.counters
    assert counters.num_preemptions > 0 and counters.num_finished_requests == 64
    assert llm.engine.kv_usage == 0 and not llm.engine.has_unfinished_requests()


def test_step_budget_and_sequence_cap_hold_while_prefills_are_chunked(hf_model_dir):
    llm = LLM(
        hf_model_dir("llama-gqa3-untied"),
        block_size=4,
        max_num_seqs=3,
        max_num_batched_tokens=10,
        verbose=False,
    )
    scheduler = llm.engine.scheduler
    plans = []

    def spy():
        plans.append(plan := schedule())
        plans[-1] = (
            [(item.seq.seq_id, item.num_new_tokens) for item in plan.scheduled],
            len(scheduler.running),
        )
        return plan

    schedule, scheduler.schedule = scheduler.schedule, spy
    prompts = random_prompts([25, 3, 8, 4, 12], seed=4)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=5))
    assert all(len(output.outputs[0].token_ids) == 5 for output in outputs)
    assert all(sum(n for _, n in scheduled) <= 10 and running <= 3 for scheduled, running in plans)
    # The 25-token prompt is split into chunks; once running, decodes are never starved by a prefill.
    assert any(n == 1 for scheduled, _ in plans for _, n in scheduled if len(scheduled) > 1)
    assert max(n for scheduled, _ in plans for _, n in scheduled) == 10
