"""The progress bar's rates and the benchmark's records."""

from __future__ import annotations

import io
import json

from rich.console import Console

from kiln.batch.progress import JobProgress, rates
from kiln.batch.runner import RunStats
from kiln.batch.spec import JobSpec
from kiln.batch.store import JobStore, Record
from kiln.bench.batch import write_records


def test_rates_and_progress_line(tmp_path):
    stats = RunStats(num_done=90, num_failed=10, num_prompt_tokens=1500, num_output_tokens=500, seconds=4.0)
    assert rates(stats) == (25.0, 500.0)
    assert rates(RunStats()) == (0.0, 0.0)
    store = JobStore(str(tmp_path / "jobs.db"))
    spec = JobSpec(kind="table", template="{{ t }}")
    job_id = store.create_job(spec, [Record(custom_id=str(i), payload={"t": "x"}) for i in range(400)])
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=False)
    with JobProgress(store.job(job_id), console=console) as progress:
        progress.update(100, stats)
        progress.progress.refresh()
    text = out.getvalue()
    assert "100/400" in text and "25.0 rec/s" in text and "500 tok/s" in text
    assert "2,160,000 rec/day" in text


def test_bench_records_are_short_varied_and_deterministic(tmp_path):
    first = write_records(tmp_path / "a.jsonl", 50).read_text()
    assert first == write_records(tmp_path / "b.jsonl", 50).read_text()
    rows = [json.loads(line) for line in first.splitlines()]
    assert len({row["id"] for row in rows}) == 50 and len({row["text"] for row in rows}) == 50
    assert max(len(row["text"].split()) for row in rows) <= 8


def test_bench_batch_times_every_configuration_with_each_workers_threads(model_dir, postgres_url, tmp_path):
    from kiln.bench.batch import bench_batch

    result = bench_batch(model_dir, tmp_path / "jobs.db", postgres_url, 24, 2, 8, repeats=1)
    shapes = [(run.store, run.num_workers, run.threads_per_worker) for run in result.runs]
    assert shapes == [("sqlite", 1, 2), ("postgresql", 1, 2), ("postgresql", 2, 1)]
    for run in result.runs:  # a worker whose engine took other than its share of threads fails the run
        assert run.num_records == 24 and sum(run.label_counts.values()) == 24
        assert len(run.all_seconds) == 1 and run.seconds == run.all_seconds[0] > 0
