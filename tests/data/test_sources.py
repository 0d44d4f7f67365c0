import gzip
import json

import pytest

from kiln.data.sources import iter_documents, resolve_sources
from kiln.errors import KilnError


def test_folders_globs_and_formats_resolve_in_sorted_order(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / "b" / "deep" / "one.txt").write_text("first file")
    (tmp_path / "b" / "two.md").write_text("second file")
    (tmp_path / "b" / "skip.bin").write_bytes(b"\x00")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"text": "zipped 0"}) + "\n\n" + json.dumps({"text": "zipped 1"}) + "\n")
    sources = resolve_sources(
        [str(tmp_path / "b"), str(tmp_path / "*.jsonl.gz"), str(tmp_path / "b" / "two.md")]
    )
    assert [path.name for path in sources] == ["a.jsonl.gz", "one.txt", "two.md"]
    documents = list(iter_documents(sources))
    assert [document.text for document in documents] == ["zipped 0", "zipped 1", "first file", "second file"]
    assert documents[1].id == f"{sources[0]}:1"
    assert (documents[2].source_index, documents[2].index) == (1, 0)


def test_unsupported_and_missing_inputs_raise(tmp_path):
    (tmp_path / "table.csv").write_text("a,b")
    with pytest.raises(KilnError, match="Unsupported input file"):
        resolve_sources([str(tmp_path / "table.csv")])
    with pytest.raises(KilnError, match="No supported files"):
        resolve_sources([str(tmp_path)])
    with pytest.raises(KilnError, match="No inputs"):
        resolve_sources([])
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(KilnError, match="bad.jsonl:1 is not valid JSON"):
        list(iter_documents(resolve_sources([str(tmp_path / "bad.jsonl")])))
