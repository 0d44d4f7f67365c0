"""SamplingParams and the Sampler: filters, penalties, min_tokens, seeds, logprobs."""

import math

import pytest
import torch

from kiln.engine import LLM, SamplingParams
from kiln.engine.sampler import Sampler, apply_penalties, argmax_rows, filter_logits
from kiln.engine.sequence import sampling_batch
from tests.engine.conftest import make_seq, random_prompts

LOGITS = torch.tensor([[4.0, 3.0, 2.0, -1.0, -2.0]])  # softmax ~ [.66, .24, .09, .004, .002]


def seqs_with(params: SamplingParams, count: int = 1, output: list[int] = ()):
    seqs = [make_seq([7, 8], seq_id=i, params=params) for i in range(count)]
    for seq in seqs:
        seq.token_ids.extend(output)
        seq.generator = params.sample_generator(seq.seq_id, torch.device("cpu"))
    return seqs


def kept(params: SamplingParams) -> set[int]:
    return set(
        torch.isfinite(filter_logits(LOGITS.clone(), sampling_batch(seqs_with(params)))[0])
        .nonzero()
        .flatten()
        .tolist()
    )


def test_filters_keep_what_they_should():
    assert kept(SamplingParams(top_k=2)) == {0, 1}
    assert kept(SamplingParams(top_p=0.8)) == {0, 1}  # .66 alone does not reach .8
    assert kept(SamplingParams(top_p=0.5)) == {0}
    assert kept(SamplingParams(min_p=0.1)) == {0, 1, 2}  # .09 / .66 > .1 is false for token 3 only
    assert kept(SamplingParams(min_p=0.2)) == {0, 1}
    assert kept(SamplingParams(top_k=3, top_p=0.95, min_p=0.0)) == {0, 1, 2}
    assert kept(SamplingParams()) == {0, 1, 2, 3, 4}


def test_samples_follow_the_filtered_distribution():
    params = SamplingParams(temperature=1.0, top_k=3)
    seqs = seqs_with(params, count=4000)
    picked = torch.tensor(
        Sampler(torch.device("cpu"), seed=0)(LOGITS.repeat(4000, 1), sampling_batch(seqs)).token_ids
    )
    frequencies = torch.bincount(picked, minlength=5).float() / 4000
    expected = LOGITS[0, :3].softmax(-1)
    assert frequencies[3:].sum() == 0
    assert (frequencies[:3] - expected).abs().max() < 0.03


def test_a_seeded_row_does_not_depend_on_its_neighbours():
    seeded = SamplingParams(temperature=1.0, seed=5)
    alone = Sampler(torch.device("cpu"), seed=0)(LOGITS, sampling_batch(seqs_with(seeded)))
    others = seqs_with(SamplingParams(temperature=1.0), count=6)
    mixed = Sampler(torch.device("cpu"), seed=1)(
        LOGITS.repeat(7, 1), sampling_batch(others[:3] + seqs_with(seeded) + others[3:])
    )
    assert mixed.token_ids[3] == alone.token_ids[0]


def test_penalties():
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    (seq,) = seqs_with(params, output=[0, 0, 3])  # prompt [7, 8] is outside the 5-token vocabulary here
    seq.token_ids[:2] = [1, 1]
    penalised = apply_penalties(LOGITS.clone(), sampling_batch([seq]))[0]
    # token 0: 4 / 2 - 0.5 - 2 * 0.25; token 1 (prompt only): 3 / 2; token 3: -1 * 2 - 0.5 - 0.25
    assert penalised.tolist() == pytest.approx([1.0, 1.5, 2.0, -2.75, -2.0])


def test_min_tokens_holds_back_stop_tokens():
    params = SamplingParams(temperature=0, min_tokens=2)
    (seq,) = seqs_with(params)
    seq.stop_token_ids = frozenset({0})
    assert Sampler(torch.device("cpu"), seed=0)(LOGITS, sampling_batch([seq])).token_ids == [1]
    seq.token_ids.extend([5, 6])
    assert Sampler(torch.device("cpu"), seed=0)(LOGITS, sampling_batch([seq])).token_ids == [0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_k=-2), "top_k must be >= 0"),
        (dict(min_p=1.5), "min_p must be in"),
        (dict(n=0), "n must be >= 1"),
        (dict(max_tokens=0), "max_tokens must be >= 1"),
        (dict(min_tokens=5, max_tokens=4), "min_tokens must be in"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(presence_penalty=3.0), "presence_penalty must be in"),
        (dict(logprobs=-1), "logprobs must be >= 0"),
        (dict(stop=["ok", ""]), "stop strings must be non-empty"),
    ],
)
def test_bad_sampling_params_say_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_filters_that_keep_only_the_top_token_equal_greedy(hf_model_dir):
    llm = LLM(hf_model_dir("qwen2-gqa2-tied"), block_size=4, verbose=False)
    prompts = random_prompts([5, 9, 2], seed=9)
    greedy = [
        o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10))
    ]
    for params in [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)]:
        sampled = llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=10, **params))
        assert [o.outputs[0].token_ids for o in sampled] == greedy


@pytest.mark.parametrize("budget", [1024, 3])  # 3: the prompt's logprobs come from several chunks
def test_logprobs_are_those_of_the_model(hf_model_dir, budget):
    directory = hf_model_dir("llama-gqa3-untied")
    llm = LLM(directory, block_size=4, max_num_batched_tokens=budget, verbose=False)
    (prompt,) = random_prompts([11], seed=10)
    params = SamplingParams(temperature=0.7, seed=0, max_tokens=6, logprobs=3, prompt_logprobs=2)
    output = llm.generate([prompt], params)[0]
    completion = output.outputs[0]
    tokens = prompt + completion.token_ids
    with torch.no_grad():
        reference = llm.engine.model(torch.tensor([tokens]))[0].log_softmax(-1)  # (T, V)
    for position, entry in enumerate(completion.logprobs, start=len(prompt) - 1):
        token = tokens[position + 1]
        expected = reference[position]
        assert entry[token].logprob == pytest.approx(expected[token].item(), abs=1e-4)
        assert entry[token].rank == int((expected > expected[token]).sum()) + 1
        assert set(expected.topk(3).indices.tolist()) <= set(entry)
    assert completion.cumulative_logprob == pytest.approx(
        sum(
            entry[token].logprob
            for entry, token in zip(completion.logprobs, completion.token_ids, strict=True)
        )
    )
    assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(prompt)
    for position, entry in enumerate(output.prompt_logprobs[1:]):
        token = prompt[position + 1]
        assert entry[token].logprob == pytest.approx(reference[position, token].item(), abs=1e-4)
        assert len(entry) in (2, 3) and math.isfinite(entry[token].logprob)


def test_argmax_rows_is_torch_argmax_with_ties_and_nan():
    values = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    values[1, 7] = values[1, 200] = values[1].max() + 1  # a tie: the first index wins
    values[2, 50] = float("nan")  # NaN counts as the largest, as torch has it
    values[3] = float("-inf")
    for rows in (values, values[:, :100], values.double(), values.bfloat16()):
        assert torch.equal(argmax_rows(rows), rows.argmax(-1))
    assert argmax_rows(values).dtype == torch.int64
