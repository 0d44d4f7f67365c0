"""`kiln bench generate --profile`: where one engine decode step spends its time.

A step's wall time splits into model matmuls, attention (the paged op or SDPA, plus the KV-pool writes),
the other torch ops (norms, RoPE, activations, sampling), and what is left: Python and framework
overhead between ops. The ops' self times come from torch.profiler over a run of decode steps; the shares
are of the wall time of the same number of steps run without the profiler.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

MATMUL_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::matmul",
    "kiln::linear",
    "mkldnn::_linear_pointwise",
)
ATTENTION_OPS = (
    "kiln::paged_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_attention_math",
    "aten::index_copy_",
    "aten::index_select",
)


@dataclass
class StepProfile:
    dtype: str
    batch: int
    context_tokens: int  # prompt length each sequence decodes after
    wall_ms: float  # per decode step, without the profiler
    profiled_wall_ms: float  # per decode step, under the profiler
    matmul_ms: float
    attention_ms: float
    other_ops_ms: float
    python_ms: float  # wall time (without the profiler) not inside any op

    def fractions(self) -> dict[str, float]:
        """Shares of the step's wall time without the profiler (whose own per-op cost lands between ops,
        so the profiled wall time would inflate the Python share)."""
        total = max(self.wall_ms, self.matmul_ms + self.attention_ms + self.other_ops_ms)
        return {
            "matmul": self.matmul_ms / total,
            "attention": self.attention_ms / total,
            "other ops": self.other_ops_ms / total,
            "python": self.python_ms / total,
        }


def _leaf_self_times(prof) -> dict[str, float]:
    """Self CPU time (ms) per op name; self times do not double count nested ops."""
    return {event.key: event.self_cpu_time_total / 1000 for event in prof.key_averages()}


def profile_decode(llm, *, batch: int, prompt_tokens: int, steps: int = 16, dtype: str = "") -> StepProfile:
    """Decode `steps` steps of `batch` sequences after `prompt_tokens`-token prompts (prefilled first)."""
    from torch.profiler import ProfilerActivity, profile

    from kiln.engine import SamplingParams

    engine = llm.engine
    vocab = engine.model.config.vocab_size
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=2 * steps + 2, ignore_eos=True)

    def start() -> None:
        for _ in range(batch):
            engine.add_request([rng.randrange(3, vocab) for _ in range(prompt_tokens)], params)
        while engine.scheduler.waiting or any(
            seq.num_computed_tokens < seq.num_prompt_tokens for seq in engine.scheduler.running
        ):
            engine.step()

    def finish() -> None:
        while engine.has_unfinished_requests():
            engine.step()

    start()
    began = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = (time.perf_counter() - began) / steps * 1000
    finish()
    start()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        began = time.perf_counter()
        for _ in range(steps):
            engine.step()
        profiled = (time.perf_counter() - began) / steps * 1000
    finish()
    times = _leaf_self_times(prof)
    matmul = sum(times.get(name, 0.0) for name in MATMUL_OPS) / steps
    attention = sum(times.get(name, 0.0) for name in ATTENTION_OPS) / steps
    ops = (
        sum(value for name, value in times.items() if name.startswith(("aten::", "kiln::", "mkldnn::")))
        / steps
    )
    return StepProfile(
        dtype=dtype,
        batch=batch,
        context_tokens=prompt_tokens,
        wall_ms=wall,
        profiled_wall_ms=profiled,
        matmul_ms=matmul,
        attention_ms=attention,
        other_ops_ms=ops - matmul - attention,
        python_ms=max(wall - ops, 0.0),
    )


def profile_shape(
    directory: Path, dtypes: tuple[str, ...], engine_config, batches=((1, 16), (64, 128)), steps: int = 16
) -> list[StepProfile]:
    """Profiles of decode steps at each (batch, prompt tokens), for each dtype."""
    from kiln.engine import LLM

    results = []
    for dtype in dtypes:
        config = engine_config.replace(dtype=dtype, max_num_seqs=64, enable_prefix_caching=False)
        llm = LLM(directory, config, verbose=False)
        for batch, prompt_tokens in batches:
            results.append(
                profile_decode(llm, batch=batch, prompt_tokens=prompt_tokens, steps=steps, dtype=dtype)
            )
        del llm
    return results


def print_profiles(profiles: list[StepProfile]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="one decode step: where the time goes (torch.profiler self times)")
    for column in (
        "dtype",
        "batch x context",
        "step (no profiler)",
        "matmul",
        "attention",
        "other ops",
        "python",
    ):
        table.add_column(column, justify="right")
    for p in profiles:
        shares = p.fractions()
        table.add_row(
            p.dtype,
            f"{p.batch} x {p.context_tokens}",
            f"{p.wall_ms:.1f} ms",
            *(f"{value:.0%}" for value in shares.values()),
        )
    Console().print(table)
