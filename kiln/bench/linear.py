"""Linear layers at decode sizes on CPU: torch's F.linear against kiln's C++ op (kiln.kernels.cpu_linear),
and for bf16 against oneDNN's GEMM on a weight packed once (kiln.kernels.packed_weight), beside the
machine's read bandwidth measured in the same run.

python -m kiln.bench.linear [--rows 1,2,4,8,16,64] [--dtypes float32,bfloat16] [--threads 2]

The shapes are the 134M Llama's (hidden 768, SwiGLU 2048, vocab 32000). A decoding model's weights do
not fit in the last-level cache, so each timed call cycles through copies of the weight that together
exceed it (`cold_bytes`): a layer reads its weight from memory, as it does in a decode step. GB/s counts
weight bytes only; GFLOP/s is 2 * rows * in * out per second. The roofline is a sum over a 512 MB fp32
tensor (a streaming read, as a GEMV's weight is), the better of a reading before and after the sweep.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
import typer

# name -> (in_features, out_features)
SHAPES: dict[str, tuple[int, int]] = {
    "qkv 768->2304": (768, 2304),
    "o_proj 768->768": (768, 768),
    "gate/up 768->2048": (768, 2048),
    "down 2048->768": (2048, 768),
    "lm_head 768->32000": (768, 32000),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class LinearTiming:
    shape: str
    dtype: str
    rows: int
    implementation: str  # "torch" (F.linear), "kiln" (torch.ops.kiln.linear) or "packed" (packed_linear)
    microseconds: float
    weight_gbs: float
    gflops: float
    fraction_of_read: float  # weight_gbs / the measured read bandwidth


@dataclass
class LinearBenchResult:
    machine: str
    torch_version: str
    threads: int
    read_gbs: float
    kiln_op_available: bool
    timings: list[LinearTiming] = field(default_factory=list)


def _best_seconds(run, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth(repeats: int = 5, megabytes: int = 512) -> float:
    """Bytes/s of a streaming read of a fp32 tensor much larger than the last-level cache. Random values:
    pages of one repeated value (torch.ones) can be merged by the host, and then read at cache speed."""
    data = torch.randn(megabytes * 2**20 // 4)
    return data.numel() * 4 / _best_seconds(data.sum, repeats)


def _time_linear(function, x: torch.Tensor, weights: list[torch.Tensor], repeats: int) -> float:
    """Seconds per call, best of `repeats` passes over every copy of the weight."""

    def run() -> None:
        for weight in weights:
            function(x, weight)

    run()  # warm-up: builds the op's thread pool, faults in the output allocation
    return _best_seconds(run, repeats) / len(weights)


def _implementations(op_available: bool, dtype: torch.dtype) -> dict[str, Any]:
    from kiln.kernels.packed_weight import packed, packed_linear, packing_available

    implementations: dict[str, Any] = {"torch": F.linear}
    if op_available:
        implementations["kiln"] = torch.ops.kiln.linear
    if dtype == torch.bfloat16 and packing_available():
        implementations["packed"] = lambda x, weight: packed_linear(x, packed(weight))
    return implementations


def run_linear_bench(
    rows: tuple[int, ...] = (1, 2, 4, 8, 16, 64),
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    shapes: tuple[str, ...] = tuple(SHAPES),
    threads: int = 2,
    repeats: int = 5,
    cold_bytes: int = 256 * 2**20,
) -> dict[str, Any]:
    """Time F.linear and the kiln op for each shape, dtype and row count; the result as a dict."""
    from kiln.kernels.cpu_extension import cpu_ops_available

    torch.set_num_threads(threads)
    op_available = cpu_ops_available()
    result = LinearBenchResult(
        machine=platform.processor() or platform.machine(),
        torch_version=torch.__version__,
        threads=threads,
        read_gbs=0.0,
        kiln_op_available=op_available,
    )
    with torch.inference_mode():
        result.read_gbs = read_bandwidth(repeats) / 1e9
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for shape in shapes:
                in_features, out_features = SHAPES[shape]
                weight_bytes = in_features * out_features * dtype.itemsize
                copies = max(1, -(-cold_bytes // weight_bytes))
                weights = [torch.randn(out_features, in_features).to(dtype) for _ in range(copies)]
                implementations = _implementations(op_available, dtype)
                if "packed" in implementations:
                    from kiln.kernels.packed_weight import pack

                    for weight in weights:
                        pack(weight)
                for num_rows in rows:
                    x = torch.randn(num_rows, in_features).to(dtype)
                    for name, function in implementations.items():
                        seconds = _time_linear(function, x, weights, repeats)
                        gbs = weight_bytes / seconds / 1e9
                        result.timings.append(
                            LinearTiming(
                                shape=shape,
                                dtype=dtype_name,
                                rows=num_rows,
                                implementation=name,
                                microseconds=seconds * 1e6,
                                weight_gbs=gbs,
                                gflops=2 * num_rows * in_features * out_features / seconds / 1e9,
                                fraction_of_read=0.0,  # below, once the bandwidth is final
                            )
                        )
                del weights
        # Best of before and after: the machine may be shared, and a busy moment only lowers a reading.
        result.read_gbs = max(result.read_gbs, read_bandwidth(repeats) / 1e9)
    for timing in result.timings:
        timing.fraction_of_read = timing.weight_gbs / result.read_gbs
    return asdict(result)


def format_table(result: dict[str, Any]) -> str:
    """One line per shape, dtype and row count: each implementation's GB/s, GFLOP/s and share of the
    read bandwidth, and its speedup over torch (kiln's op; the packed GEMM where bf16 weights are packed)."""
    names = [
        n for n in ("torch", "kiln", "packed") if any(t["implementation"] == n for t in result["timings"])
    ]
    header = f"{'shape':<20} {'dtype':<9} {'rows':>4}"
    for name in names:
        header += f"  {name + ' GB/s':>11} {'GFLOP/s':>8} {'of read':>7}" + (
            f" {'speedup':>7}" if name != "torch" else ""
        )
    lines = [
        f"{result['machine']}, torch {result['torch_version']}, {result['threads']} threads; read "
        f"bandwidth (sum of 512 MB) {result['read_gbs']:.1f} GB/s; weights read from memory",
        header,
    ]
    by_key: dict[tuple, dict[str, dict]] = {}
    for timing in result["timings"]:
        key = (timing["shape"], timing["dtype"], timing["rows"])
        by_key.setdefault(key, {})[timing["implementation"]] = timing
    for (shape, dtype, rows), sides in by_key.items():
        line = f"{shape:<20} {dtype:<9} {rows:>4}"
        for name in names:
            if name not in sides:
                line += " " * (30 if name == "torch" else 38)
                continue
            t = sides[name]
            line += f"  {t['weight_gbs']:>11.1f} {t['gflops']:>8.1f} {t['fraction_of_read']:>7.0%}"
            if name != "torch":
                line += f" {sides['torch']['microseconds'] / t['microseconds']:>6.2f}x"
        lines.append(line)
    return "\n".join(lines)


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def linear_command(
    rows: Annotated[
        str, typer.Option(help="Row counts (tokens per step), comma-separated.")
    ] = "1,2,4,8,16,64",
    dtypes: Annotated[str, typer.Option(help="Comma-separated: float32, bfloat16.")] = "float32,bfloat16",
    threads: Annotated[int, typer.Option(help="torch.set_num_threads for every side.")] = 2,
    repeats: Annotated[int, typer.Option(help="Timed passes per case; the best counts.")] = 5,
    output: Annotated[Path | None, typer.Option(help="Also write the result as JSON here.")] = None,
) -> None:
    """Linear layers at decode sizes on CPU: torch F.linear vs kiln's C++ op (and, for bf16 where oneDNN is
    built, its GEMM on a weight packed once), beside the read bandwidth."""
    from kiln.errors import KilnError

    dtype_names = _parse_list(dtypes)
    unknown = [name for name in dtype_names if name not in DTYPES]
    if unknown:
        raise KilnError(f"unknown dtype(s) {', '.join(unknown)}; choose from {', '.join(DTYPES)}")
    try:
        row_counts = tuple(int(value) for value in _parse_list(rows))
    except ValueError:
        raise KilnError(f"--rows takes comma-separated integers, e.g. 1,4,16; got {rows!r}") from None
    result = run_linear_bench(rows=row_counts, dtypes=dtype_names, threads=threads, repeats=repeats)
    print(format_table(result))
    if output is not None:
        import json

        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {output}")


if __name__ == "__main__":
    typer.run(linear_command)
