"""q/k-norm (Qwen3) under tensor parallelism: each rank normalises its own heads with the replicated norm
weights (their gradients summed over tp), and 2-way TP matches one process; the job exports a Qwen3 model
transformers loads."""

import pytest
import torch

import kiln
from tests.train.torchrun import assert_close, losses, prepare_data, train

QK_NORM = ("--set", "model.qk_norm=true", "--set", "batch_size=8")


@pytest.mark.slow
def test_qk_norm_under_tensor_parallel_matches_single_process(tmp_path):
    import transformers

    data_dir = prepare_data(tmp_path / "data")
    single = train(1, data_dir, tmp_path / "single", *QK_NORM, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    tp = train(2, data_dir, tmp_path / "tp", *QK_NORM, "--tp", "2", "--dp-shard", "1", timeout=600)
    assert tp.returncode == 0, tp.stderr[-6000:]
    assert len(losses(tmp_path / "tp")) == 10
    assert_close(losses(tmp_path / "tp"), losses(tmp_path / "single"))
    ours = kiln.load_model(tmp_path / "tp" / "model")
    assert ours.config.family == "qwen3" and ours.config.qk_norm
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tp" / "model").eval()
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-4
