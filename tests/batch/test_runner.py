"""Jobs run through kiln.LLM: a tagging job's labels equal kiln.LLM's own scores of the same prompts; an
OpenAI batch's greedy outputs equal LLM.generate; per-record failures are recorded and counted."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from kiln.batch.backend import LLMBackend
from kiln.batch.jobs import run_job, submit
from kiln.batch.runner import BatchRunner
from kiln.batch.spec import JobSpec
from kiln.batch.store import JobStore
from kiln.engine.sampling_params import SamplingParams
from tests.batch.conftest import LABELS, TEMPLATE, write_rows

TAGGING = JobSpec(kind="table", template=TEMPLATE, id_column="id", labels=LABELS)


def oracle_labels(llm, texts: list[str]) -> list[tuple[str, dict[str, float]]]:
    """kiln.LLM directly: for each prompt, each label's summed token logprobs after it; the best label."""
    tokenizer = llm.tokenizer
    label_ids = [tokenizer.encode(" " + label, add_special_tokens=False) for label in LABELS]
    prompts, lengths = [], []
    for text in texts:
        ids = tokenizer.encode(f"Text: {text}\nLabel:")
        lengths.append(len(ids))
        prompts += [ids + extra for extra in label_ids]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    answers = []
    for i, length in enumerate(lengths):
        scores = {}
        for label, out in zip(LABELS, outputs[i * len(LABELS) : (i + 1) * len(LABELS)], strict=True):
            ids = out.prompt_token_ids
            scores[label] = sum(out.prompt_logprobs[p][ids[p]].logprob for p in range(length, len(ids)))
        answers.append((max(LABELS, key=scores.get), scores))
    return answers


def check_tagging_job(db_url, llm, tmp_path, count: int) -> None:
    path = write_rows(tmp_path / "rows.jsonl", count)
    store = JobStore(db_url)
    job_id = submit(store, path, TAGGING)
    stats = run_job(store, job_id, llm=llm, chunk_size=128, show_progress=False)
    assert stats.num_done == count and stats.num_failed == 0
    rows = list(store.results(job_id))
    assert len(rows) == count and len({row["custom_id"] for row in rows}) == count
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    expected = oracle_labels(llm, texts)
    for row, (label, scores) in zip(rows, expected, strict=True):
        response = json.loads(row["response"])
        assert row["output"] == label, row["custom_id"]
        for name in LABELS:
            assert response["scores"][name] == pytest.approx(scores[name], abs=1e-3)
    assert len({row["output"] for row in rows}) > 1  # a model that always says one label proves little
    assert store.job(job_id).status == "completed"


def test_tagging_job_equals_llm(db_url, llm, tmp_path):
    check_tagging_job(db_url, llm, tmp_path, 300)


@pytest.mark.slow
def test_tagging_job_of_2000_records_equals_llm(db_url, llm, tmp_path):
    check_tagging_job(db_url, llm, tmp_path, 2000)


def test_openai_batch_equals_llm_generate(db_url, llm, tmp_path):
    lines = []
    for i in range(12):
        body = {"model": "m", "max_tokens": 8, "temperature": 0}
        if i % 3 == 0:
            url, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": f"hello {i}"}]
        elif i % 3 == 1:
            url, body["prompt"] = "/v1/completions", f"def f{i}(x):"
        else:
            url, body = "/v1/embeddings", {"model": "m", "input": [f"text {i}", "more"]}
        lines.append({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    store = JobStore(db_url)
    job_id = submit(store, path, JobSpec(kind="openai"))
    run_job(store, job_id, llm=llm, chunk_size=5, show_progress=False)
    rows = {row["custom_id"]: row for row in store.results(job_id)}
    assert set(rows) == {line["custom_id"] for line in lines}
    for line in lines:
        response, body = json.loads(rows[line["custom_id"]]["response"]), line["body"]
        greedy = SamplingParams(temperature=0, max_tokens=8)
        if line["url"] == "/v1/chat/completions":
            want = llm.chat(body["messages"], greedy)[0].outputs[0].text
            assert response["choices"][0]["message"]["content"] == want
        elif line["url"] == "/v1/completions":
            assert response["choices"][0]["text"] == llm.generate(body["prompt"], greedy)[0].outputs[0].text
        else:
            got = torch.tensor([item["embedding"] for item in response["data"]])
            torch.testing.assert_close(got, llm.embed(body["input"]), atol=1e-5, rtol=1e-4)


def test_bad_records_fail_alone_with_a_reason(db_url, llm, tmp_path):
    rows = [{"id": "ok", "text": "fine"}, {"id": "long", "text": "word " * 3000}, {"id": "missing"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    store = JobStore(db_url)
    job_id = submit(store, path, TAGGING)
    stats = run_job(store, job_id, llm=llm, show_progress=False)
    assert (stats.num_done, stats.num_failed) == (1, 2)
    results = {row["custom_id"]: row for row in store.results(job_id)}
    assert results["ok"]["status"] == "done" and results["ok"]["output"] in LABELS
    assert results["long"]["status"] == "failed" and "max_model_len" in results["long"]["error"]
    assert results["missing"]["status"] == "failed" and "'text' is undefined" in results["missing"]["error"]
    info = store.job(job_id)
    assert info.status == "completed" and info.counts["failed"] == 2


def test_openai_request_with_bad_parameters_fails_alone(db_url, llm, tmp_path):
    lines = [
        {
            "custom_id": "a",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "x", "max_tokens": 2},
        },
        {"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "top_p": 7}},
    ]
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    store = JobStore(db_url)
    job_id = submit(store, path, JobSpec(kind="openai"))
    run_job(store, job_id, llm=llm, show_progress=False)
    results = {row["custom_id"]: row for row in store.results(job_id)}
    assert results["a"]["status"] == "done"
    assert results["b"]["status"] == "failed" and "top_p" in results["b"]["error"]


def test_two_workers_share_a_postgres_job(postgres_url, model_dir, tmp_path):
    import kiln

    path = write_rows(tmp_path / "rows.jsonl", 600)
    job_id = submit(JobStore(postgres_url), path, TAGGING)
    workers = [
        BatchRunner(
            JobStore(postgres_url),
            job_id,
            LLMBackend(kiln.LLM(model_dir, verbose=False), "m"),
            worker_id=name,
            chunk_size=16,
        )
        for name in ("w1", "w2")
    ]
    threads = [threading.Thread(target=worker.run) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = list(JobStore(postgres_url).results(job_id))
    assert sorted(row["record_index"] for row in rows) == list(range(600))  # union complete, each once
    by_worker = {name: sum(row["worker"] == name for row in rows) for name in ("w1", "w2")}
    assert all(by_worker.values()), by_worker  # both took part
    assert sum(worker.stats.num_done for worker in workers) == 600


def test_a_dead_workers_chunk_is_reclaimed_after_its_lease(postgres_url, llm, tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", 40)
    store = JobStore(postgres_url)
    job_id = submit(store, path, TAGGING)
    dead = JobStore(postgres_url).claim(job_id, "dead-worker", 10, lease_s=1.5)  # then it "dies"
    runner = BatchRunner(store, job_id, LLMBackend(llm, "m"), worker_id="live", chunk_size=8, poll_s=0.1)
    stats = runner.run()  # waits for the dead worker's lease to pass, then takes its chunk
    assert stats.num_done == 40
    rows = list(store.results(job_id))
    assert sorted(row["record_index"] for row in rows) == list(range(40))
    assert {row["worker"] for row in rows} == {"live"}
    assert {r.record_index for r in dead} <= {row["record_index"] for row in rows}
