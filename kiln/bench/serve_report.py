"""Reporting for `kiln bench serve`: the results table, JSON without infinities, and the latency-against-
throughput plot of a sweep."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from kiln.errors import KilnError


def to_json(value: Any) -> Any:
    """`value` with what JSON lacks spelled out: an all-at-once rate as "inf", a missing statistic as null."""
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else "inf"
    return str(value) if isinstance(value, Path) else value


def plot_sweep(runs: list[dict[str, Any]], path: Path) -> Path:
    """TTFT, TPOT and E2E (median and p99) against output throughput, one point per request rate."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KilnError("--plot needs matplotlib: pip install matplotlib") from None
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=120)
    throughput = [run["output_throughput"] for run in runs]
    for axis, metric in zip(axes, ("ttft", "tpot", "e2e"), strict=True):
        for stat, style in (("p50_ms", "o-"), ("p99_ms", "s--")):
            axis.plot(throughput, [run[metric][stat] for run in runs], style, label=stat.split("_")[0])
        for x, run in zip(throughput, runs, strict=True):
            rate = run["config"]["request_rate"]
            axis.annotate(
                "inf" if math.isinf(rate) else f"{rate:g}/s", (x, run[metric]["p50_ms"]), fontsize=7
            )
        axis.set(xlabel="output tokens/s", ylabel=f"{metric.upper()} (ms)", title=metric.upper())
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"{runs[0]['model']} at {runs[0]['base_url']}", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    rate = summary["config"]["request_rate"]
    table = Table(
        title=f"{summary['model']}: {summary['completed']}/{summary['num_requests']} requests "
        f"at {'all at once' if math.isinf(rate) else f'{rate:g}/s'}"
    )
    table.add_column("metric")
    for name in ("mean", "p50", "p90", "p99"):
        table.add_column(f"{name} (ms)", justify="right")
    for metric in ("ttft", "tpot", "itl", "e2e"):
        stats = summary[metric]
        table.add_row(metric.upper(), *(f"{stats[f'{n}_ms']:.1f}" for n in ("mean", "p50", "p90", "p99")))
    console = Console()
    console.print(table)
    goodput = "" if summary["goodput"] is None else f", goodput {summary['goodput']:.2f} req/s"
    console.print(
        f"{summary['request_throughput']:.2f} req/s, {summary['output_throughput']:.1f} output tokens/s, "
        f"{summary['total_token_throughput']:.1f} total tokens/s{goodput}; {summary['failed']} failed "
        f"in {summary['duration_s']:.1f}s"
    )
    for error in summary["errors"]:
        console.print(f"[red]error:[/] {error}", markup=True, highlight=False)
