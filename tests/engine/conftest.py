"""Shared engine fixtures: tiny models with and without a tokenizer, and random prompts."""

import json
import os
from pathlib import Path

import pytest
import torch

from kiln.engine.outputs import RequestMetrics
from kiln.engine.sampling_params import SamplingParams
from kiln.engine.sequence import EngineRequest, Sequence
from tests.hf_cases import VOCAB, build_hf_model, build_text_model

CORPUS = [Path(os.__file__), Path(json.__file__)]


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory) -> Path:
    """The `tiny` preset (RoPE, GQA, 1024 positions) with a byte-level BPE tokenizer and a chat template."""
    return build_text_model(tmp_path_factory.mktemp("text-model"))


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """hf_model_dir(case) -> directory of that tiny random HF model (built once per session)."""
    built: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in built:
            built[case] = tmp_path_factory.mktemp(case)
            build_hf_model(case, built[case])
        return built[case]

    return get


def random_prompts(lengths, seed: int = 0, vocab_size: int = VOCAB) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (length,), generator=generator).tolist() for length in lengths]


def make_seq(token_ids: list[int], seq_id: int = 0, params: SamplingParams | None = None) -> Sequence:
    """A bare sequence (no model, no tokenizer) for block manager, scheduler and sampler tests."""
    params = params or SamplingParams(max_tokens=4)
    request = EngineRequest(
        request_id=str(seq_id),
        prompt=None,
        prompt_token_ids=token_ids,
        params=params,
        metrics=RequestMetrics(arrival_time=0.0),
    )
    seq = Sequence(
        seq_id=seq_id,
        index=0,
        request=request,
        token_ids=list(token_ids),
        num_prompt_tokens=len(token_ids),
        params=params,
        stop_token_ids=frozenset(),
        max_total_tokens=len(token_ids) + 4,
    )
    request.sequences.append(seq)
    return seq
