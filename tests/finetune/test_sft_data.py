"""SFT data: chat and prompt/completion JSONL to shards with a loss mask; the loader masks all but
completion tokens; bad records are one-line errors."""

import json

import numpy as np
import pytest

import kiln
from kiln.data.sft import IGNORE_INDEX, SFTLoader, encode_example, prepare_sft
from kiln.errors import KilnError
from tests.finetune.tasks import chat, write_jsonl
from tests.hf_cases import build_text_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_text_model(tmp_path_factory.mktemp("model"))


def test_chat_mask_covers_exactly_the_assistant_turns(model_dir):
    tokenizer = kiln.load_tokenizer(model_dir)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "bye"},
    ]
    ids, mask = encode_example({"messages": messages}, tokenizer, "x")
    assert len(ids) == len(mask)
    trained = [tokenizer.decode([t], skip_special_tokens=False) for t, m in zip(ids, mask, strict=True) if m]
    assert "".join(trained) == "hello there<|im_end|>\nbye<|im_end|>\n"
    # the prompt part is exactly what generation sees before the first assistant turn
    prompt = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=True)
    assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)])


def test_prompt_completion_trains_the_completion_and_its_stop(model_dir, tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": " 4"}] * 3)
    manifest = prepare_sft([path], tmp_path / "data", model_dir, val_fraction=0.0)
    assert manifest["format"] == "sft" and manifest["splits"]["train"]["num_documents"] == 3
    tokens = np.load(tmp_path / "data" / "train_00000.npy")
    mask = np.load(tmp_path / "data" / "train_00000.mask.npy")
    assert tokens.shape == mask.shape
    loader = SFTLoader(tmp_path / "data", seq_len=32, batch_size=2)
    inputs, targets = loader.batch(0)
    assert inputs.shape == targets.shape == (2, 32)  # padded to seq_len
    assert loader.longest == len(tokens) // 3 - 1  # three equal examples
    tokenizer = kiln.load_tokenizer(model_dir)
    kept = targets[0][targets[0] != IGNORE_INDEX].tolist()
    assert tokenizer.decode(kept, skip_special_tokens=False) == " 4<|endoftext|>"
    assert (
        loader.batch(5)[0].tolist()
        == SFTLoader(tmp_path / "data", seq_len=32, batch_size=2).batch(5)[0].tolist()
    )


def test_cli_prepares_chat_data_and_refuses_bad_records(model_dir, tmp_path):
    from typer.testing import CliRunner

    from kiln.cli import app

    path = write_jsonl(tmp_path / "c.jsonl", [chat("do", "a b c", "c b a")] * 20)
    result = CliRunner().invoke(
        app,
        [
            "data",
            "prepare",
            "--format",
            "chat",
            str(path),
            "-o",
            str(tmp_path / "d"),
            "--tokenizer",
            str(model_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (
        "examples" in result.output
        and json.loads((tmp_path / "d" / "manifest.json").read_text())["format"] == "sft"
    )
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "no messages"}])
    with pytest.raises(
        KilnError, match=r"bad.jsonl:1: a record needs 'messages' or 'prompt' and 'completion'"
    ):
        prepare_sft([bad], tmp_path / "e", model_dir)
    no_reply = write_jsonl(tmp_path / "nr.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(KilnError, match="no assistant message"):
        prepare_sft([no_reply], tmp_path / "f", model_dir)
    with pytest.raises(KilnError, match="holds pretraining shards|No manifest"):
        SFTLoader(tmp_path, seq_len=8, batch_size=1)
