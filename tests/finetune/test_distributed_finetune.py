"""`kiln finetune` under torchrun on CPU (gloo), 2 processes: LoRA under DDP and FSDP2 (padded and, under
DDP, packed batches), and prompt tuning under DDP, match one process on the same global batch; the
optimizer holds only the adapter; rank 0 writes one PEFT adapter that loads."""

import os
import subprocess

import pytest
import torch
import torch.distributed.checkpoint as dcp

import kiln
from kiln.data.sft import prepare_sft
from kiln.finetune import attach_adapter, read_adapter
from tests.finetune.tasks import chat, reverse, split_words, write_jsonl
from tests.hf_cases import build_text_model
from tests.train.torchrun import assert_close, launcher, losses

STEPS = 4
LAYOUTS = {
    "ddp": ("--set", "dp_replicate=2", "--set", "dp_shard=1"),
    "fsdp": (),  # dp_shard defaults to the world size: FSDP2
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_text_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def task_data(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("task")
    words, _ = split_words(num_train=80)
    path = write_jsonl(folder / "do.jsonl", [chat("do", w, reverse(w)) for w in words])
    prepare_sft([path], folder / "data", model_dir, val_fraction=0.0)
    return folder / "data"


def finetune(nproc: int, model_dir, data, out, method: str, *extra: str) -> subprocess.CompletedProcess:
    """`kiln finetune` in fp32 with a global batch of 8 examples (8 / nproc per process)."""
    command = launcher(nproc) + [
        "finetune",
        *("--base", str(model_dir), "--data", str(data), "--out-dir", str(out), "--method", method),
        *("--max-steps", str(STEPS), "--batch-size", str(8 // nproc), "--lr", "1e-2"),
        *("--set", "precision=fp32", "--set", "log_every=1", "--set", f"checkpoint_every={STEPS}"),
        *extra,
    ]
    # One thread per process: two processes share this machine's two cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _optimizer_keys(out) -> set[str]:
    """The parameter names the checkpoint's optimizer state holds."""
    metadata = dcp.FileSystemReader(str(out / "checkpoints" / f"step-{STEPS:08d}")).read_metadata()
    return {
        k.split(".", 2)[2].rsplit(".", 1)[0]
        for k in metadata.state_dict_metadata
        if k.startswith("optim.state.")
    }


@pytest.fixture(scope="module")
def single_lora(model_dir, task_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single-lora")
    finetune(1, model_dir, task_data, out, "lora")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_lora_under_torchrun_matches_one_process(model_dir, task_data, single_lora, tmp_path, layout):
    result = finetune(2, model_dir, task_data, tmp_path, "lora", *layout)
    assert ("DDP 2" if layout else "FSDP 2") in result.stderr
    assert len(losses(tmp_path)) == STEPS  # rank 0 alone writes metrics
    assert_close(losses(tmp_path), losses(single_lora))
    # only the adapter's tensors have optimizer state
    keys = _optimizer_keys(tmp_path)
    assert keys and all("lora_" in k for k in keys), keys
    assert keys == _optimizer_keys(single_lora)
    # one adapter, equal to the one-process run's, that loads on the base
    adapter, single = read_adapter(tmp_path / "adapter"), read_adapter(single_lora / "adapter")
    assert adapter.lora.keys() == single.lora.keys()
    for name, (a, b) in adapter.lora.items():
        torch.testing.assert_close(a, single.lora[name][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b, single.lora[name][1], atol=1e-5, rtol=1e-4)
    model = kiln.load_model(model_dir)
    attach_adapter(model, adapter)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


@pytest.mark.slow
def test_packed_lora_under_ddp_matches_one_process(model_dir, task_data, tmp_path):
    finetune(1, model_dir, task_data, tmp_path / "single", "lora", "--packing", "--seq-len", "64")
    finetune(
        2, model_dir, task_data, tmp_path / "ddp", "lora", "--packing", "--seq-len", "64", *LAYOUTS["ddp"]
    )
    assert_close(losses(tmp_path / "ddp"), losses(tmp_path / "single"))


@pytest.mark.slow
def test_prompt_tuning_under_ddp_matches_one_process(model_dir, task_data, tmp_path):
    finetune(1, model_dir, task_data, tmp_path / "single", "prompt")
    finetune(2, model_dir, task_data, tmp_path / "ddp", "prompt", *LAYOUTS["ddp"])
    assert_close(losses(tmp_path / "ddp"), losses(tmp_path / "single"))
    prompts = [read_adapter(tmp_path / run / "adapter").prompt for run in ("ddp", "single")]
    torch.testing.assert_close(*prompts, atol=1e-5, rtol=1e-4)
