"""Incremental decoding through the KV cache equals full recomputation."""

import pytest
import torch

import kiln
from tests.hf_cases import CASE_NAMES, build_hf_model, padded_batch


@pytest.mark.parametrize("case", CASE_NAMES)
def test_incremental_decoding_equals_full_recomputation(case, tmp_path):
    build_hf_model(case, tmp_path)
    model = kiln.load_model(tmp_path)
    ids, mask = padded_batch(seed=5, lengths=(14, 6, 10))
    prompt_length = 6
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = model.new_kv_cache(ids.shape[0], ids.shape[1])
        # A prefill chunk, a second chunk of several tokens, then one token at a time.
        chunks = [model(ids[:, :prompt_length], attention_mask=mask[:, :prompt_length], kv_cache=cache)]
        chunks.append(model(ids[:, prompt_length:9], attention_mask=mask[:, :9], kv_cache=cache))
        for t in range(9, ids.shape[1]):
            chunks.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], kv_cache=cache))
    incremental = torch.cat(chunks, dim=1)
    real = mask.bool()
    assert (full[real] - incremental[real]).abs().max().item() <= 1e-5


def test_cache_without_padding_mask(tmp_path):
    build_hf_model("llama-gqa3-untied", tmp_path)
    model = kiln.load_model(tmp_path)
    ids = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(2, 12)
        parts = [model(ids[:, :5], kv_cache=cache)] + [
            model(ids[:, t : t + 1], kv_cache=cache) for t in range(5, 12)
        ]
    assert (full - torch.cat(parts, dim=1)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_tracks_fp32(dtype, tmp_path):
    build_hf_model("llama-gqa3-untied", tmp_path)
    reference = kiln.load_model(tmp_path, dtype="float32")
    model = kiln.load_model(tmp_path, dtype=dtype)
    assert model.embed_tokens.weight.dtype == dtype
    ids = torch.randint(0, 101, (2, 10))
    with torch.no_grad():
        logits = model(ids)
        assert logits.dtype == dtype
        assert (logits.float() - reference(ids)).abs().max().item() < 0.5
