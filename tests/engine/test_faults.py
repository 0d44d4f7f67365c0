"""Fault isolation: one request's bad input or failing sampling/output step never stops the others.

Values that would fail a whole step (token ids past the vocabulary, top-k past it, a temperature so small
that logits overflow) are refused or normalised when the request is made; a fault that still happens
inside a step fails that request alone ("error"), and the engine keeps serving.
"""

from __future__ import annotations

import pytest
import torch

from kiln.engine import LLM, SamplingParams
from kiln.errors import KilnError
from tests.engine.conftest import random_prompts
from tests.hf_cases import VOCAB

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
POISON_SEED = 666  # the sampler below raises on any step that holds a row of this request


@pytest.fixture(scope="module")
def llm(hf_model_dir):
    return LLM(hf_model_dir("llama-gqa3-untied"), num_kv_blocks=256, block_size=4, verbose=False)


class PoisonedSampler:
    """The engine's sampler, raising whenever a batch contains a row with POISON_SEED's generator."""

    def __init__(self, sampler, poisoned: torch.Generator) -> None:
        self.sampler, self.poisoned, self.num_raised = sampler, poisoned, 0

    def __call__(self, logits, batch):
        if any(generator is self.poisoned for generator in batch.generators):
            self.num_raised += 1
            raise RuntimeError("injected sampler fault")
        return self.sampler(logits, batch)


def test_one_failing_request_leaves_eight_others_token_identical(llm):
    engine = llm.engine
    prompts = random_prompts([5, 9, 3, 17, 8, 12, 6, 20, 11], seed=3)
    clean = [out.outputs[0].token_ids for out in llm.generate(prompts[:8], GREEDY)]
    requests = [engine.add_request(prompt, GREEDY) for prompt in prompts[:8]]
    poison = engine.make_request(prompts[8], SamplingParams(temperature=1.0, seed=POISON_SEED, max_tokens=12))
    engine.add_request(poison)
    real_sampler = engine.sampler
    engine.sampler = PoisonedSampler(real_sampler, poison.sequences[0].generator)
    try:
        finals = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    finals[output.request_id] = output
    finally:
        engine.sampler = real_sampler
    assert engine.sampler is real_sampler and finals[poison.request_id].outputs[0].finish_reason == "error"
    assert "injected sampler fault" in finals[poison.request_id].error
    assert [r.output().outputs[0].token_ids for r in requests] == clean
    assert all(finals[r.request_id].error is None for r in requests)
    assert engine.kv_usage == 0 and engine.num_running == engine.num_waiting == 0
    # The engine still serves: the same greedy text as before the fault.
    assert llm.generate(prompts[:1], GREEDY)[0].outputs[0].token_ids == clean[0]


def test_a_failing_output_step_fails_only_its_request(llm, monkeypatch):
    engine = llm.engine
    prompts = random_prompts([6, 7, 8], seed=4)
    clean = [out.outputs[0].token_ids for out in llm.generate(prompts, GREEDY)]
    original = engine.output_processor.append_token
    bad = engine.make_request(prompts[1], GREEDY)

    def append_token(seq, token_id, logprobs):
        if seq.request is bad and seq.num_output_tokens == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer fault")
        original(seq, token_id, logprobs)

    monkeypatch.setattr(engine.output_processor, "append_token", append_token)
    good = [engine.add_request(prompts[0], GREEDY), engine.add_request(prompts[2], GREEDY)]
    engine.add_request(bad)
    while engine.has_unfinished_requests():
        engine.step()
    output = bad.output()
    assert output.outputs[0].finish_reason == "error" and "UnicodeDecodeError" in output.error
    assert len(output.outputs[0].token_ids) == 3  # what it had before the fault
    assert [r.output().outputs[0].token_ids for r in good] == [clean[0], clean[2]]
    assert engine.kv_usage == 0


def test_a_forward_pass_fault_propagates(llm, monkeypatch):
    """The forward pass writes the shared KV pool: its failure is not one request's and must surface."""
    engine = llm.engine

    def broken(*args, **kwargs):
        raise RuntimeError("injected forward fault")

    monkeypatch.setattr(engine.runner, "execute", broken)
    engine.add_request([5, 6, 7], GREEDY)
    with pytest.raises(RuntimeError, match="injected forward fault"):
        engine.step()
    monkeypatch.undo()
    while engine.has_unfinished_requests():  # the request is still there; the next step runs it
        engine.step()


@pytest.mark.parametrize(
    ("params", "param"),
    [
        (dict(min_tokens=1, stop_token_ids=[VOCAB]), "stop_token_ids"),
        (dict(stop_token_ids=[999999]), "stop_token_ids"),
        (dict(stop_token_ids=[2**63]), "stop_token_ids"),
        (dict(top_k=2**63), "top_k"),
        (dict(top_k=VOCAB + 1), "top_k"),
        (dict(logprobs=VOCAB + 1), "logprobs"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    ],
)
def test_values_that_would_fail_a_step_are_refused_with_the_field(llm, params, param):
    with pytest.raises(KilnError) as raised:
        llm.engine.make_request([5, 6, 7], SamplingParams(max_tokens=4, **params))
    assert raised.value.param == param
    assert llm.generate([[5, 6, 7]], GREEDY)[0].outputs[0].finish_reason == "length"


def test_tiny_temperature_is_greedy_and_top_k_minus_one_is_off(llm):
    prompts = random_prompts([7, 4], seed=5)
    greedy = [out.outputs[0].token_ids for out in llm.generate(prompts, GREEDY)]
    tiny = SamplingParams(temperature=5e-324, max_tokens=12, ignore_eos=True)
    assert tiny.temperature == 0
    assert [out.outputs[0].token_ids for out in llm.generate(prompts, tiny)] == greedy
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(top_k=VOCAB).top_k == VOCAB  # the whole vocabulary: allowed
    llm.engine.make_request([5], SamplingParams(top_k=VOCAB))
