"""bf16 linear weights also held in oneDNN's blocked layout, for the GEMMs of mid-sized steps on CPUs with
AMX or AVX512-BF16; and w8a8's int8 weights, for oneDNN's int8 GEMM on CPUs with AMX (`_int8_packing`).

Above kiln's small-row op (cpu_linear.MAX_ROWS) a bf16 linear is torch's `F.linear`, which on CPU runs
oneDNN's GEMM (AMX tiles or AVX512-BF16 dot products) and reorders the (N, K) weight into its blocked
layout on every call. Reordered once
(`torch.ops.mkldnn._reorder_linear_weight`, as inductor's CPU freezing does) and multiplied with
`torch.ops.mkldnn._linear_pointwise`, the same GEMM gives the same bits (oneDNN both ways) in less time.
Measured on a 2-vCPU Xeon with AMX (Emerald Rapids, 2 threads, the 134M Llama's weights read from memory,
`python -m kiln.bench.linear --rows 1,4,8,16,64,256 --dtypes bfloat16`, benchmarks/linear-emr.json): the
packed GEMM against `F.linear` 1.0-1.35x at 1-4 rows (where kiln's own op is 1.5-2.8x), 0.85-2.1x at 8-16,
1.6-2.7x at 64 (one outlier, gate/up, 0.71x), 1.1-2.5x at 256; a probe at 512-1024 rows gave a layer's
linears 0.83-1.07x, so prefill chunks keep `F.linear` there. On AVX512-BF16 CPUs without AMX the packed
GEMM wins from 3 rows to 1024 (`_packed_rows`). So the engine packs every bf16 linear of the model on such
CPUs (`pack_linears`; the copy costs the weights' bytes once more, which the start-up line
reports, and is skipped where it would not leave the machine enough memory) and `packed_rows` says for how
many rows a packed weight is used.

A packed copy belongs to its weight tensor and to that tensor's version: a weight changed in place (its
`_version` moves) is packed again on its next use, so a stale copy is never multiplied.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.kernels.cpu_extension import cpu_flags


def _packed_rows(flags: frozenset[str]) -> dict[torch.dtype, int]:
    """Most rows a packed weight is used for, by dtype, on a CPU with these flags (fewer go to kiln's op,
    more to F.linear); no entry where packing was not measured to win.
    - AMX (Emerald Rapids, above): up to 256 rows.
    - AVX512-BF16 without AMX (a 2-vCPU AMD EPYC Zen 4, 2026-12-07, `python -m kiln.bench.linear --rows
      1,2,4,8,16,32,64,128,256,1024 --dtypes bfloat16`, benchmarks/linear-zen4.json): the packed GEMM against
      F.linear 1.3-1.7x at 1 row and 1.0-1.6x at 2 (kiln's op 2.1-3.5x and 1.6-2.7x), 1.6-2.1x at 4 (the op
      1.15-1.8x), 1.5-1.9x at 8-16, 1.3-1.5x at 32, 1.2-1.4x at 64, 1.1-1.2x at 128, 1.0-1.1x at 256 and at
      1024 (the engine's default step budget), so it takes bf16 from 3 rows to 1024 (cpu_linear._max_rows
      gives kiln's op 1-2)."""
    if "amx_bf16" in flags:
        return {torch.bfloat16: 256}
    if "avx512_bf16" in flags:
        return {torch.bfloat16: 1024}
    return {}


def _int8_packing(flags: frozenset[str]) -> bool:
    """Whether int8 weights (w8a8's) are packed for oneDNN's int8 GEMM (`onednn::qlinear_prepack`): on CPUs
    with AMX-INT8, where w8a8 otherwise runs torch._int_mm, which reorders the weight on every call.
    2-vCPU Xeon with AMX (2026-12-07, 2 threads, weights cycled from memory, us a call, int8 x already
    quantized): at 64 rows the packed GEMM took 199 / 93 / 188 / 188 / 1,789 us for the 134M model's qkv /
    o_proj / gate / down / LM head against torch._int_mm's 270 / 95 / 248 / 176 / 3,705 (and the packed bf16
    GEMM's 297 / 115 / 274 / 318 / 3,218); at 16 rows 0.9-2.5x faster than torch._int_mm.
    Not with AVX512-VNNI alone: on a Zen 4 EPYC (torch 2.13.0's oneDNN 3.12) the prepacked weight's layout
    (BA16a64b4a) sends the GEMM to oneDNN's scalar reference kernel (`ref_int8` in ONEDNN_VERBOSE): 1.1 s
    for 64 x 768 x 2048 against torch._int_mm's 0.9 ms."""
    amx = "amx_int8" in flags
    return amx and torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")


PACKED_ROWS: dict[torch.dtype, int] = _packed_rows(cpu_flags())
if _int8_packing(cpu_flags()):
    PACKED_ROWS[torch.int8] = 1 << 62  # every row count above the small-row op (kiln/quant/linear.py)
_HINT_ROWS = 64  # the batch size oneDNN picks the blocked layout for (the offline decode step)
_ATTRIBUTE = "_kiln_packed"  # on the weight tensor: (weight version, packed weight)


def _cpu_can_pack(flags: frozenset[str]) -> bool:
    """oneDNN reorders a bf16 weight only on CPUs with AVX-NE-CONVERT or AVX-512 BW/VL/DQ; elsewhere
    (AVX2-only CPUs: AMD before Zen 4, Intel client cores) `_reorder_linear_weight` raises."""
    return "avx_ne_convert" in flags or {"avx512bw", "avx512vl", "avx512dq"} <= flags


def packing_available() -> bool:
    """Whether bf16 weights can be packed here: this torch has oneDNN's packed linear ops (CPU builds with
    mkldnn) and this CPU has what oneDNN's bf16 reorder needs."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and _cpu_can_pack(cpu_flags())
    )


def _can_pack(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or weight.dim() != 2 or not packed_rows(weight.dtype):
        return False
    return weight.dtype == torch.int8 or packing_available()


def packed_rows(dtype: torch.dtype) -> int:
    """Most rows a packed weight of this dtype takes (0: packing is off for it)."""
    return PACKED_ROWS.get(dtype, 0)


def has_packed(weight: torch.Tensor) -> bool:
    """Whether `pack` made a copy of `weight` (current or not)."""
    return _ATTRIBUTE in weight.__dict__


def packed(weight: torch.Tensor) -> torch.Tensor | None:
    """The packed copy of `weight` made by `pack` (repacked if the weight changed in place since), or None
    where it has none."""
    held = weight.__dict__.get(_ATTRIBUTE)
    if held is None:
        return None
    version, copy = held
    if version != weight_version(weight):
        return pack(weight)
    return copy


def pack(weight: torch.Tensor) -> torch.Tensor:
    """Reorder a 2-D CPU weight (N, K), bf16 or int8, into oneDNN's layout for its GEMM (int8: the one
    `onednn::qlinear_pointwise` multiplies), keep it on the weight and return it."""
    if weight.dtype == torch.int8:
        copy = torch.ops.onednn.qlinear_prepack(weight.detach(), [_HINT_ROWS, weight.shape[1]])
    else:
        copy = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _HINT_ROWS)
    weight.__dict__[_ATTRIBUTE] = (weight_version(weight), copy)
    return copy


def weight_version(weight: torch.Tensor) -> int:
    """The weight's in-place version; an inference tensor (made under torch.inference_mode) has none, and
    is taken as unchanged (-1): such a tensor changed in place inside inference mode keeps its old copy."""
    return -1 if weight.is_inference() else weight._version


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` through weight's packed copy, for x (M, K) (bit-identical to F.linear)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def pack_linears(model: nn.Module, budget: int | None = None) -> tuple[int, int]:
    """Pack every 2-D weight of a plain `nn.Linear` in `model`, its `output_weight` (the LM head) and what
    a module lists in its `packable_weights()` (w8a8's int8 weights: kiln/quant/linear.py), whose dtype
    `packed_rows` allows, unless the copies would take more than `budget` bytes (None: no limit), in which
    case none is packed. Returns (bytes the copies hold, bytes they would hold but for `budget`)."""
    weights = []
    for module in model.modules():
        if type(module) is nn.Linear:
            weights.append(module.weight)
        packable = getattr(module, "packable_weights", None)
        if callable(packable):
            weights += list(packable())
    head = getattr(model, "output_weight", None)
    if isinstance(head, torch.Tensor):
        weights.append(head)
    chosen, seen = [], set()
    for weight in weights:
        if id(weight) in seen or not _can_pack(weight):
            continue
        seen.add(id(weight))
        chosen.append(weight)
    total = sum(weight.numel() * weight.element_size() for weight in chosen)
    if budget is not None and total > budget:
        return 0, total
    for weight in chosen:
        pack(weight)
    return total, 0
