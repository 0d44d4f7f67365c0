"""Packed SFT training (--packing): examples back to back in fixed rows, attention masked across them,
positions restarting per document, loss on completion tokens only; equal to unpacked training."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kiln
from kiln.data.sft import IGNORE_INDEX, SFTLoader, prepare_sft
from kiln.data.sft_packing import PackedSFTLoader
from kiln.errors import KilnError
from kiln.finetune import LoraConfig
from kiln.train.document_attention import DocumentAttention, document_starts, packed_hidden_states
from kiln.train.finetune import FinetuneConfig, FinetuneTrainer, finetune_train_config
from tests.finetune.tasks import chat, reverse, split_words, write_jsonl
from tests.hf_cases import build_text_model

SEPARATOR = 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_text_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def task_data(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("task")
    words, _ = split_words(num_train=60)
    # answers of different lengths, some with a second turn: documents of varied sizes
    records = [chat("do", w, reverse(w) * (1 + i % 3)) for i, w in enumerate(words)]
    prepare_sft([write_jsonl(folder / "do.jsonl", records)], folder / "data", model_dir, val_fraction=0.0)
    return folder / "data"


def _documents(row: torch.Tensor, targets: torch.Tensor, separator: int):
    """Split one packed row into (inputs, targets) per document, padding documents dropped."""
    starts = document_starts(row[None], separator)[0].nonzero().flatten().tolist() + [len(row)]
    for start, end in zip(starts[:-1], starts[1:], strict=True):
        if (targets[start:end] != IGNORE_INDEX).any():
            yield row[start:end], targets[start:end]


def test_packed_rows_hold_whole_examples_and_only_their_targets(task_data):
    packed = PackedSFTLoader(task_data, seq_len=96, batch_size=3, seed=1)
    padded = SFTLoader(task_data, seq_len=96, batch_size=1)
    examples = {tuple(t.tolist()): m for t, m in padded.examples}
    inputs, targets = packed.batch(0)
    assert inputs.shape == targets.shape == (3, 96)
    for row in range(3):
        documents = list(_documents(inputs[row], targets[row], packed.pad_token_id))
        assert len(documents) >= 2  # several examples share a row
        for doc_inputs, doc_targets in documents:
            # one whole example: its tokens (the EOS too, as an input, unless it ends the row) and the
            # next tokens of its completion part as targets; nothing after its EOS
            tokens = doc_inputs.tolist()
            full = next(t for t in examples if list(t[: len(tokens)]) == tokens and len(t) - len(tokens) < 2)
            mask = examples[full]
            want = torch.tensor(full[1:]).masked_fill(torch.from_numpy(mask[1:] == 0), IGNORE_INDEX)
            assert torch.equal(doc_targets[: len(want)], want)
            assert (doc_targets[len(want) :] == IGNORE_INDEX).all()
    # the same step gives the same batch (resumable); another rank takes other rows of the same draw
    assert torch.equal(packed.batch(0)[0], inputs)
    ranks = [
        PackedSFTLoader(task_data, seq_len=96, batch_size=1, seed=1, rank=r, world_size=3) for r in range(3)
    ]
    assert torch.equal(torch.cat([r.batch(0)[0] for r in ranks]), inputs)


@pytest.mark.parametrize("position", ["rope", "alibi", "learned"])
def test_packed_hidden_states_equal_each_document_alone(position):
    torch.manual_seed(0)
    config = kiln.preset("tiny", vocab_size=64, position=position)
    model = kiln.Transformer(config).eval()
    lengths = [[5, 9, 3, 1], [12, 4, 2]]  # documents per row, each ending with the separator
    rows = []
    for row_lengths in lengths:
        docs = [torch.cat([torch.randint(2, 64, (n - 1,)), torch.tensor([SEPARATOR])]) for n in row_lengths]
        rows.append(torch.cat(docs))
    width = max(len(r) for r in rows)
    ids = torch.stack([F.pad(r, (0, width - len(r)), value=SEPARATOR) for r in rows])
    with torch.no_grad():
        packed = packed_hidden_states(model, SEPARATOR)(ids)
        for row, row_lengths in enumerate(lengths):
            start = 0
            for n in row_lengths:
                alone = model.hidden_states(ids[row : row + 1, start : start + n])[0]
                torch.testing.assert_close(packed[row, start : start + n], alone, atol=1e-5, rtol=1e-5)
                start += n
    positions = DocumentAttention(ids, SEPARATOR, config).positions
    assert positions[0, :6].tolist() == [0, 1, 2, 3, 4, 0]


def test_flash_varlen_path_equals_the_masked_sdpa_path():
    torch.manual_seed(0)
    config = kiln.preset("tiny", vocab_size=64)
    ids = torch.tensor([[5, 6, SEPARATOR, 7, 8, 9, SEPARATOR, SEPARATOR], [3, SEPARATOR, 4, 4, 4, 4, 4, 4]])
    q = torch.randn(2, 4, 8, 16, requires_grad=True)
    k = torch.randn(2, 2, 8, 16, requires_grad=True)
    v = torch.randn(2, 2, 8, 16, requires_grad=True)
    masked = DocumentAttention(ids, SEPARATOR, config, "torch")(0, q, k, v)
    flash_backend = DocumentAttention(ids, SEPARATOR, config, "triton")
    flash = flash_backend._flash(q, k, v)
    torch.testing.assert_close(flash, masked, atol=1e-4, rtol=1e-4)
    grads = torch.autograd.grad(masked.square().sum(), (q, k, v))
    flash_grads = torch.autograd.grad(flash.square().sum(), (q, k, v))
    for got, want in zip(flash_grads, grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _unpacked_loss(model, inputs, targets, separator):
    """The mean cross-entropy over all kept targets, each document run alone (no packing, no padding)."""
    total, count = 0.0, 0
    for row in range(inputs.shape[0]):
        for doc_inputs, doc_targets in _documents(inputs[row], targets[row], separator):
            logits = model(doc_inputs[None])[0]
            total = total + F.cross_entropy(logits, doc_targets, ignore_index=IGNORE_INDEX, reduction="sum")
            count += int((doc_targets != IGNORE_INDEX).sum())
    return total / count


@pytest.mark.parametrize("method", ["lora", "full"])
def test_packed_training_equals_unpacked_loss_and_gradients(model_dir, task_data, tmp_path, method):
    train = finetune_train_config(
        str(model_dir), str(task_data), str(tmp_path), batch_size=2, seq_len=128, precision="fp32"
    )
    config = FinetuneConfig(
        base=str(model_dir), method=method, lora=LoraConfig(rank=4), train=train, packing=True
    )
    trainer = FinetuneTrainer(config)
    model = trainer.model
    with torch.no_grad():  # a non-zero LoRA B, so A gets gradients too
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    inputs, targets = trainer.train_data.batch(0)
    assert (inputs == trainer.train_data.pad_token_id).sum() > 2  # several documents in each row
    packed_loss = trainer.loss_module(inputs, targets)
    packed_grads = torch.autograd.grad(packed_loss, params)
    unpacked_loss = _unpacked_loss(model, inputs, targets, trainer.train_data.pad_token_id)
    unpacked_grads = torch.autograd.grad(unpacked_loss, params)
    torch.testing.assert_close(packed_loss, unpacked_loss, atol=1e-5, rtol=1e-5)
    for got, want in zip(packed_grads, unpacked_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and a real step runs
    assert np.isfinite(trainer.train_step().loss)


def test_packing_with_prompt_tuning_is_a_one_line_error(model_dir, task_data, tmp_path):
    train = finetune_train_config(str(model_dir), str(task_data), str(tmp_path))
    with pytest.raises(KilnError, match="packing works with --method lora or full"):
        FinetuneConfig(base=str(model_dir), method="prompt", train=train, packing=True)
