"""Logits and greedy generation match transformers for every family kiln reads."""

import pytest
import torch

import kiln
from kiln.generation import GenerationConfig, generate
from tests.hf_cases import CASE_NAMES, build_hf_model, padded_batch


@pytest.mark.parametrize("case", CASE_NAMES)
def test_logits_match_transformers(case, tmp_path):
    hf = build_hf_model(case, tmp_path)
    model = kiln.load_model(tmp_path)
    with torch.no_grad():
        for lengths in [(16,), (16, 16), (12, 5, 9, 1)]:
            ids, mask = padded_batch(seed=len(lengths), lengths=lengths)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            got = model(ids, attention_mask=mask)
            real = mask.bool()
            assert (expected[real] - got[real]).abs().max().item() <= 1e-4
        ids = torch.randint(3, 101, (2, 20))
        assert (hf(input_ids=ids).logits - model(ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", CASE_NAMES)
def test_greedy_generation_matches_transformers(case, tmp_path):
    hf = build_hf_model(case, tmp_path)
    model = kiln.load_model(tmp_path)
    ids, mask = padded_batch(seed=7, lengths=(10, 4, 7))
    with torch.no_grad():
        expected = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0
        )[:, ids.shape[1] :]
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
    got = generate(model, prompts, GenerationConfig(max_new_tokens=32))
    assert got == expected.tolist()
