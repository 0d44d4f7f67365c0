"""The fast-path candidates of kiln.quant at the 134M layer shapes (kiln.bench.linear's SHAPES), weights
read from memory (copies cycled past the last-level cache), at 1 and 64 rows: kiln's bf16 linear (the
baseline), kiln's quant_linear op (int8, int4 g128), torch's `_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu` (g128), and w8a8's int8 x int8 sums: torch's `_int_mm` and kiln's `int8_mm`;
where the CPU packs weights for oneDNN, the packed bf16 GEMM (the engine's bf16 path above its small-row op)
and the packed int8 GEMM (w8a8's above its op's rows). Microseconds per call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kiln.bench.linear import SHAPES
from kiln.bench.timing import best_of
from kiln.kernels import cpu_linear
from kiln.kernels.packed_weight import pack, packed_linear, packed_rows, packing_available
from kiln.quant import QuantizedLinear, parse_scheme


def _candidates(weight: torch.Tensor, rows: int) -> dict[str, tuple[Callable, Any]]:
    """name -> (function of (x, prepared weight), prepare(weight)); x is bf16 (rows, K)."""
    int8, int4 = parse_scheme("int8"), parse_scheme("int4", 128)
    # kiln's linear routing: its op up to the CPU's row limit (cpu_linear.MAX_ROWS), else F.linear
    candidates = {
        "bf16 (kiln linear / F.linear)": (lambda x, w: cpu_linear.linear(x, w), lambda w: w.bfloat16()),
        "kiln quant_linear int8": (
            lambda x, q: torch.ops.kiln.quant_linear(x, q.qweight, q.scale, None, None, 8),
            lambda w: QuantizedLinear.from_float(w, None, int8),
        ),
        "kiln quant_linear int4": (
            lambda x, q: torch.ops.kiln.quant_linear(x, q.qweight, q.scale, q.offset, None, 4),
            lambda w: QuantizedLinear.from_float(w, None, int4),
        ),
        "torch _weight_int8pack_mm": (
            lambda x, q: torch.ops.aten._weight_int8pack_mm(x, q[0], q[1]),
            lambda w: (
                QuantizedLinear.from_float(w, None, int8).qweight,
                QuantizedLinear.from_float(w, None, int8).scale[:, 0].bfloat16(),
            ),
        ),
        "torch _weight_int4pack_mm_for_cpu": (
            lambda x, q: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q[0], 128, q[1]),
            _torch_int4,
        ),
        "torch _int_mm (x already int8)": (
            lambda x, q: torch._int_mm(q[1], q[0].T),
            lambda w: (QuantizedLinear.from_float(w, None, int8).qweight, None),
        ),
        "kiln int8_mm (x already int8)": (  # the same int32 as _int_mm (w8a8 on CPUs without VNNI)
            lambda x, q: torch.ops.kiln.int8_mm(q[1], q[0]),
            lambda w: (QuantizedLinear.from_float(w, None, int8).qweight, None),
        ),
    }
    if packing_available():  # the engine's bf16 GEMM above its small-row op on such CPUs
        candidates["bf16 packed for oneDNN"] = (packed_linear, lambda w: pack(w.bfloat16()))
    if packed_rows(torch.int8):  # w8a8's sums above its op's rows on AMX CPUs (float of the int32)
        candidates["oneDNN int8, packed (x already int8)"] = (
            lambda x, q: torch.ops.onednn.qlinear_pointwise(
                q[1],
                1.0,
                0,
                q[0],
                torch.ones(q[0].shape[1]),
                torch.zeros(q[0].shape[1], dtype=torch.long),
                None,
                1.0,
                0,
                torch.float32,
                "none",
                [],
                "",
            ),  # fmt: skip
            lambda w: (pack(QuantizedLinear.from_float(w, None, int8).qweight), None),
        )
    return candidates


def _torch_int4(weight: torch.Tensor):
    layer = QuantizedLinear.from_float(weight, None, parse_scheme("int4", 128))
    u = layer.integer_weight().to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    # torch's int4 layout: w = (u - 8) * scale + zero  ->  zero = (8 - z) * scale
    zeros = (8 - layer.zero.float()) * layer.scale
    return packed, torch.stack([layer.scale.T, zeros.T], dim=-1).bfloat16().contiguous()


@torch.no_grad()
def bench_kernels(rows_list=(1, 64), repeats: int = 5, cold_bytes: int = 128 * 2**20) -> list[dict[str, Any]]:
    out = []
    for shape, (in_features, out_features) in SHAPES.items():
        copies = max(1, -(-cold_bytes // (in_features * out_features)))
        weights = [torch.randn(out_features, in_features) / in_features**0.5 for _ in range(copies)]
        for rows in rows_list:
            x = torch.randn(rows, in_features).bfloat16()
            x_int8 = torch.randint(-127, 128, (rows, in_features), dtype=torch.int8)
            for name, (run, prepare) in _candidates(weights[0], rows).items():
                prepared = [prepare(w) for w in weights]
                if "x already int8" in name:
                    prepared = [(p[0], x_int8) for p in prepared]
                try:
                    seconds, _ = best_of(repeats, lambda: [run(x, p) for p in prepared])  # noqa: B023
                except RuntimeError as error:  # an op this torch build lacks on CPU
                    out.append({"shape": shape, "rows": rows, "kernel": name, "error": str(error)[:120]})
                    continue
                per_call = seconds / len(prepared)
                out.append({"shape": shape, "rows": rows, "kernel": name, "microseconds": per_call * 1e6})
    return out


def format_kernels(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'shape':<20} {'rows':>4}  {'kernel':<36} {'us':>9}"]
    for row in rows:
        value = f"{row['microseconds']:>9.0f}" if "microseconds" in row else f"  {row['error']}"
        lines.append(f"{row['shape']:<20} {row['rows']:>4}  {row['kernel']:<36} {value}")
    return "\n".join(lines)
