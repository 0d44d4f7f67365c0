"""Tagging with a fixed label set: each label's tokens are scored after the prompt (the sum of their
logprobs, read from the engine's prompt logprobs of prompt + label), and the best label is taken. No
free text is parsed, and every record gets one of the labels."""

from __future__ import annotations

from kiln.engine.outputs import RequestOutput
from kiln.engine.sampling_params import SamplingParams

# Greedy, one token (which is not used): the engine scores the prompt + label tokens on the way.
SCORING_PARAMS = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)


def label_prompts(prompt_ids: list[int], label_ids: list[list[int]]) -> list[list[int]]:
    """One scoring prompt per label: the prompt's tokens followed by the label's."""
    return [prompt_ids + ids for ids in label_ids]


def label_score(output: RequestOutput, num_prompt_tokens: int) -> float:
    """The summed logprob of the tokens after the first `num_prompt_tokens` of a scoring prompt."""
    assert output.prompt_logprobs is not None, "scoring requests ask for prompt logprobs"
    ids = output.prompt_token_ids
    return sum(
        output.prompt_logprobs[position][ids[position]].logprob
        for position in range(num_prompt_tokens, len(ids))
    )


def best_label(
    labels: tuple[str, ...], outputs: list[RequestOutput], num_prompt_tokens: int
) -> tuple[str, dict[str, float]]:
    """The label with the highest score (the first on a tie) and every label's score."""
    scores = {label: label_score(out, num_prompt_tokens) for label, out in zip(labels, outputs, strict=True)}
    return max(labels, key=lambda label: scores[label]), scores
