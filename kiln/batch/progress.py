"""JobProgress: a rich progress bar over a job's records, with records/s, tokens/s, the ETA and the
records/day those rates imply."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kiln.batch.runner import RunStats
from kiln.batch.store import JobInfo

SECONDS_PER_DAY = 86_400


def rates(stats: RunStats) -> tuple[float, float]:
    """This worker's records/s and tokens/s (prompt + output) so far."""
    if stats.seconds <= 0:
        return 0.0, 0.0
    tokens = stats.num_prompt_tokens + stats.num_output_tokens
    return stats.num_records / stats.seconds, tokens / stats.seconds


class JobProgress:
    """Use as a context manager; `update` after each chunk with the store's counts and this run's stats."""

    def __init__(self, job: JobInfo, console: Console | None = None, enabled: bool = True) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rates]}"),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            disable=not enabled,
        )
        finished = job.num_records - job.num_unfinished
        self.task = self.progress.add_task(job.job_id, total=job.num_records, completed=finished, rates="")

    def __enter__(self) -> JobProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, num_finished: int, stats: RunStats) -> None:
        records_per_s, tokens_per_s = rates(stats)
        text = (
            f"{records_per_s:,.1f} rec/s  {tokens_per_s:,.0f} tok/s  "
            f"{records_per_s * SECONDS_PER_DAY:,.0f} rec/day"
        )
        self.progress.update(self.task, completed=num_finished, rates=text)
