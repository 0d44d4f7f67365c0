"""The model on CUDA in half precision matches its CPU fp32 run (runs where a GPU is lent)."""

import pytest
import torch

import kiln
from tests.hf_cases import CASE_NAMES, build_hf_model, padded_batch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("dtype", ["float32", "bf16", "fp16"])
def test_cuda_matches_cpu(case, dtype, tmp_path):
    build_hf_model(case, tmp_path)
    reference = kiln.load_model(tmp_path, dtype="float32")
    model = kiln.load_model(tmp_path, dtype=dtype, device="cuda")
    ids, mask = padded_batch(seed=1)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask)
        got = model(ids.cuda(), attention_mask=mask.cuda()).float().cpu()
    tolerance = 1e-3 if dtype == "float32" else 0.3
    assert (expected - got)[mask.bool()].abs().max().item() <= tolerance
