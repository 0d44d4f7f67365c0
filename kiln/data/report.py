"""What `kiln data prepare` shows: a progress bar with documents/s and tokens/s, and a summary table."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TimeElapsedColumn
from rich.table import Table
from rich.text import Text


class _RateColumn(ProgressColumn):
    """Documents/s from rich's windowed speed estimate; tokens/s (when the task counts tokens) over the
    task's lifetime in this process."""

    def render(self, task: Task) -> Text:
        rate = f"{_si(task.finished_speed or task.speed or 0.0)} docs/s"
        if "tokens" in task.fields and task.elapsed:
            rate += f"  {_si(task.fields['tokens'] / task.elapsed)} tok/s"
        return Text(rate, style="progress.data.speed")


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def progress_bar(*, enabled: bool = True) -> Progress:
    """A rich Progress for the prepare stages; disabled, it accepts the same calls and prints nothing."""
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(bar_width=14),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
    )


def summary_table(manifest: dict[str, Any]) -> Table:
    """Documents in, dropped per reason, and documents/tokens/shards out per split."""
    table = Table(title="kiln data prepare")
    table.add_column("step")
    table.add_column("documents", justify="right")
    table.add_column("tokens", justify="right")
    table.add_column("shards", justify="right")
    documents = manifest["documents"]
    table.add_row("read", f"{documents['read']:,}", "", "")
    for reason, count in documents["dropped"].items():
        table.add_row(f"dropped: {reason.replace('_', ' ')}", f"{count:,}", "", "")
    table.add_row("kept", f"{documents['kept']:,}", "", "", end_section=True)
    for split, summary in manifest["splits"].items():
        table.add_row(
            f"{split} ({manifest['dtype']})",
            f"{summary['num_documents']:,}",
            f"{summary['num_tokens']:,}",
            f"{len(summary['shards'])}",
        )
    return table
