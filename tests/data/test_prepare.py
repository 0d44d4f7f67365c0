import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from kiln.data import prepare as prepare_module
from kiln.data.dedup import content_hash, word_shingles
from kiln.data.prepare import PrepareConfig, prepare, split_index
from kiln.data.report import summary_table
from kiln.data.shards import ShardWriter, open_shards, split_documents
from kiln.errors import KilnError
from kiln.tokenizer import Tokenizer

from .corpus import jaccard, prose, with_substitutions, words

VAL_FRACTION = 0.3


def _lines(text_words: list[str]) -> str:
    return "\n".join(" ".join(text_words[i : i + 12]) + "." for i in range(0, len(text_words), 12))


def build_corpus(root: Path) -> list[tuple[str, str | None]]:
    """Text files, a JSONL and a Parquet file; returns (text, expected drop reason) in input order."""
    base = words(240, seed=100)
    near = with_substitutions(base, 2, seed=1)
    assert jaccard(word_shingles(_lines(base), 5), word_shingles(_lines(near), 5)) > 0.9
    texts_dir = root / "a_texts"
    (texts_dir / "sub").mkdir(parents=True)
    text_docs = [
        ("good_0.txt", _lines(base), None),
        ("good_1.txt", prose(120, seed=101) + " Literal <|endoftext|> stays text.", None),
        *((f"good_{i}.txt", prose(120, seed=100 + i), None) for i in range(2, 5)),
        ("junk.txt", " ".join("#$%&*{}[]<>|~^" + str(i) for i in range(80)), "symbol_ratio"),
        ("short.txt", "Too short to keep.", "too_short"),
        ("sub/copy.md", _lines(base), "exact_duplicate"),
    ]
    for name, text, _ in text_docs:
        (texts_dir / name).write_text(text)
    (texts_dir / "ignored.csv").write_text("not,a,document")
    jsonl_docs = [(prose(120, seed=200 + i), None) for i in range(5)]
    jsonl_docs.insert(2, (_lines(near), "near_duplicate"))
    jsonl_docs.append(
        ("\n".join(["Subscribe now to read more."] * 10 + [prose(60, seed=250)]), "repeated_lines")
    )
    with open(root / "b_docs.jsonl", "w") as handle:
        for text, _ in jsonl_docs:
            handle.write(json.dumps({"id": 1, "body": text}) + "\n")
    parquet_docs = [(prose(120, seed=300 + i), None) for i in range(5)]
    parquet_docs += [
        ("\n" + jsonl_docs[0][0] + "  \n", "exact_duplicate"),
        (prose(80, 301) + "x" * 6000, "long_line"),
    ]
    pq.write_table(pa.table({"body": [text for text, _ in parquet_docs]}), root / "c_data.parquet")
    ordered_text = sorted(text_docs, key=lambda item: str((texts_dir / item[0]).resolve()))
    return [(text, reason) for _, text, reason in ordered_text] + jsonl_docs + parquet_docs


def config_for(root: Path, out: Path, **overrides) -> PrepareConfig:
    settings = dict(
        inputs=[str(root / "a_texts"), str(root / "*.jsonl"), str(root / "c_data.parquet")],
        output_dir=str(out),
        text_field="body",
        vocab_size=300,
        val_fraction=VAL_FRACTION,
        show_progress=False,
    )
    return PrepareConfig(**(settings | overrides))


def test_prepare_end_to_end(tmp_path):
    expected = build_corpus(tmp_path / "corpus")
    manifest = prepare(config_for(tmp_path / "corpus", tmp_path / "out"))

    kept = [text for text, reason in expected if reason is None]
    dropped = {}
    for _, reason in expected:
        if reason is not None:
            dropped[reason] = dropped.get(reason, 0) + 1
    assert manifest["documents"]["read"] == len(expected) == 22
    assert {k: v for k, v in manifest["documents"]["dropped"].items() if v} == dropped
    assert manifest["documents"]["kept"] == len(kept) == 15
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 300
    assert (manifest["dedup"]["lsh_bands"], manifest["dedup"]["lsh_rows"]) == (18, 7)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest

    tokenizer = Tokenizer.from_dir(tmp_path / "out" / manifest["tokenizer"])
    tokenizer.backend.encode_special_tokens = True  # as prepare encodes: special-token spellings are text
    assert manifest["eos_token_id"] == tokenizer.eos_token_id
    for index, split in enumerate(("train", "val")):
        split_texts = [text for text in kept if split_index(content_hash(text), VAL_FRACTION) == index]
        assert split_texts, "the corpus should put documents in both splits"
        documents = [
            document.tolist()
            for tokens in open_shards(tmp_path / "out", split)
            for document in split_documents(np.asarray(tokens), tokenizer.eos_token_id)
        ]
        assert documents == tokenizer.encode_batch(split_texts, add_special_tokens=False)
        assert manifest["splits"][split]["num_documents"] == len(split_texts)
        assert manifest["splits"][split]["num_tokens"] == sum(len(d) + 1 for d in documents)

    console = Console(file=io.StringIO(), width=120)
    console.print(summary_table(manifest))
    rendered = console.file.getvalue()
    assert "dropped: near duplicate" in rendered and "train (uint16)" in rendered


def test_given_tokenizer_is_copied_and_progress_bar_renders(tmp_path, tokenizer_dir, capsys):
    build_corpus(tmp_path / "corpus")
    config = config_for(
        tmp_path / "corpus", tmp_path / "out", tokenizer=str(tokenizer_dir), show_progress=True
    )
    manifest = prepare(config)
    assert manifest["vocab_size"] == 400
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").read_bytes() == (
        tokenizer_dir / "tokenizer.json"
    ).read_bytes()
    assert "tokenize" in capsys.readouterr().out


def _outputs(directory: Path) -> dict[str, bytes]:
    return {
        path.name: path.read_bytes()
        for path in sorted(directory.glob("*.npy")) + [directory / "manifest.json"]
    }


def _interrupt_after(monkeypatch, target, name: str, num_calls: int) -> None:
    original = getattr(target, name)
    calls = 0

    def failing(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls > num_calls:
            raise RuntimeError("simulated kill")
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)


def _jsonl_corpus(root: Path, num_documents: int) -> None:
    root.mkdir()
    with open(root / "docs.jsonl", "w") as handle:
        for seed in range(num_documents):
            handle.write(json.dumps({"text": prose(60 + seed % 40, seed)}) + "\n")


def _jsonl_config(root: Path, out: Path, tokenizer_dir: Path) -> PrepareConfig:
    return PrepareConfig(
        inputs=[str(root / "docs.jsonl")],
        output_dir=str(out),
        tokenizer=str(tokenizer_dir),
        val_fraction=VAL_FRACTION,
        shard_size_tokens=1500,
        batch_documents=7,
        show_progress=False,
    )


def test_interrupted_run_resumes_to_identical_output(tmp_path, tokenizer_dir, monkeypatch):
    _jsonl_corpus(tmp_path / "corpus", 80)
    reference = prepare(_jsonl_config(tmp_path / "corpus", tmp_path / "reference", tokenizer_dir))
    assert (
        len(reference["splits"]["train"]["shards"]) >= 3 and reference["splits"]["val"]["num_documents"] > 0
    )

    with monkeypatch.context() as patch:
        _interrupt_after(patch, ShardWriter, "add", 50)
        with pytest.raises(RuntimeError, match="simulated kill"):
            prepare(_jsonl_config(tmp_path / "corpus", tmp_path / "out", tokenizer_dir))
    progress = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert progress["splits"]["train"]["shards"], "the interruption should come after a committed shard"
    assert not (tmp_path / "out" / "manifest.json").exists()
    (tmp_path / "out" / ".train_00007.npy.tmp").write_bytes(b"half a shard")  # killed mid-write

    resumed = prepare(_jsonl_config(tmp_path / "corpus", tmp_path / "out", tokenizer_dir))
    assert resumed == reference
    assert _outputs(tmp_path / "out") == _outputs(tmp_path / "reference")
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_interrupted_selection_resumes_to_identical_output(tmp_path, tokenizer_dir, monkeypatch):
    _jsonl_corpus(tmp_path / "corpus", 30)
    reference = prepare(_jsonl_config(tmp_path / "corpus", tmp_path / "reference", tokenizer_dir))
    with monkeypatch.context() as patch:
        _interrupt_after(patch, prepare_module, "filter_reason", 10)
        with pytest.raises(RuntimeError, match="simulated kill"):
            prepare(_jsonl_config(tmp_path / "corpus", tmp_path / "out", tokenizer_dir))
    assert prepare(_jsonl_config(tmp_path / "corpus", tmp_path / "out", tokenizer_dir)) == reference
    assert _outputs(tmp_path / "out") == _outputs(tmp_path / "reference")


def test_finished_run_is_not_redone_and_other_arguments_are_refused(tmp_path, tokenizer_dir, monkeypatch):
    _jsonl_corpus(tmp_path / "corpus", 10)
    config = _jsonl_config(tmp_path / "corpus", tmp_path / "out", tokenizer_dir)
    manifest = prepare(config)
    with monkeypatch.context() as patch:
        _interrupt_after(patch, ShardWriter, "add", 0)
        assert prepare(config) == manifest
    other = _jsonl_config(tmp_path / "corpus", tmp_path / "out", tokenizer_dir)
    other.val_fraction = 0.5
    with pytest.raises(KilnError, match="--overwrite"):
        prepare(other)
    other.overwrite = True
    assert prepare(other)["val_fraction"] == 0.5


def test_bad_inputs_raise_kiln_errors(tmp_path):
    with pytest.raises(KilnError, match="matches no file"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "missing*.txt")], output_dir=str(tmp_path / "out")))
    (tmp_path / "docs.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(KilnError, match="--text-field"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "docs.jsonl")], output_dir=str(tmp_path / "out")))


def test_all_documents_dropped_raises(tmp_path):
    (tmp_path / "tiny.txt").write_text("Too short.")
    config = PrepareConfig(
        inputs=[str(tmp_path / "tiny.txt")], output_dir=str(tmp_path / "out"), show_progress=False
    )
    with pytest.raises(KilnError, match="All 1 documents were dropped"):
        prepare(config)
