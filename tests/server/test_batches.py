"""The OpenAI Batch API against a real `kiln serve --batch-db`: the `openai` client uploads a file,
creates a batch, polls it, downloads the output; every custom_id is answered once, with what the
completions endpoint answers greedily."""

from __future__ import annotations

import json
import time

import openai
import pytest

from tests.batch.conftest import PG_SERVER  # noqa: F401 (the PostgreSQL variant's server)


@pytest.fixture(scope="module")
def batch_server(start_server, tmp_path_factory):
    db = tmp_path_factory.mktemp("batch-db") / "jobs.db"
    return start_server("--batch-db", str(db), "--max-num-seqs", "16")


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def requests_file(tmp_path, count: int, bad: int | None = None):
    lines = []
    for i in range(count):
        body = {"model": "m", "prompt": f"def f{i}(x):", "max_tokens": 6, "temperature": 0}
        if i == bad:
            body["top_p"] = 5  # refused by this request alone
        lines.append({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions", "body": body})
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path, lines


def wait_done(api: openai.OpenAI, batch_id: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = api.batches.retrieve(batch_id)
        if batch.status in ("completed", "cancelled", "failed"):
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout}s")


def test_openai_client_runs_a_batch(batch_server, tmp_path):
    api = client(batch_server)
    path, lines = requests_file(tmp_path, 20, bad=7)
    uploaded = api.files.create(file=path.open("rb"), purpose="batch")
    assert (
        uploaded.bytes == path.stat().st_size and api.files.retrieve(uploaded.id).filename == "requests.jsonl"
    )
    assert api.files.content(uploaded.id).text == path.read_text()
    batch = api.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/completions",
        completion_window="24h",
        metadata={"team": "tags"},
    )
    assert batch.status == "in_progress" and batch.request_counts.total == 20
    batch = wait_done(api, batch.id)
    assert batch.status == "completed" and batch.metadata == {"team": "tags"}
    assert (batch.request_counts.completed, batch.request_counts.failed) == (19, 1)
    output = [json.loads(line) for line in api.files.content(batch.output_file_id).text.splitlines()]
    errors = [json.loads(line) for line in api.files.content(batch.error_file_id).text.splitlines()]
    answered = [line["custom_id"] for line in output + errors]
    assert sorted(answered) == sorted(line["custom_id"] for line in lines)  # each once
    assert [line["custom_id"] for line in errors] == ["req-7"] and "top_p" in errors[0]["error"]["message"]
    for line in output[:5]:
        i = int(line["custom_id"].split("-")[1])
        direct = api.completions.create(
            model=batch.model, prompt=f"def f{i}(x):", max_tokens=6, temperature=0
        )
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["choices"][0]["text"] == direct.choices[0].text
    assert batch.id in [listed.id for listed in api.batches.list()]


def test_bad_batch_input_is_400_and_nothing_is_created(batch_server, tmp_path):
    api = client(batch_server)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\nnot json\n')
    uploaded = api.files.create(file=path.open("rb"), purpose="batch")
    before = len(api.batches.list().data)
    with pytest.raises(openai.BadRequestError, match="line 2 is not valid JSON"):
        api.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    assert len(api.batches.list().data) == before
    with pytest.raises(openai.NotFoundError):
        api.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        api.batches.create(input_file_id="file-nope", endpoint="/v1/completions", completion_window="24h")


def test_cancel_a_batch(batch_server, tmp_path):
    api = client(batch_server)
    path, _ = requests_file(tmp_path, 300)
    uploaded = api.files.create(file=path.open("rb"), purpose="batch")
    batch = api.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    cancelled = api.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    batch = wait_done(api, batch.id)
    assert batch.status == "cancelled"
    counts = batch.request_counts
    assert counts.completed + counts.failed < 300  # the rest never ran
    if batch.output_file_id:
        lines = api.files.content(batch.output_file_id).text.splitlines()
        assert len(lines) == counts.completed
