"""Linear layers on CPU for few rows (decode): kiln's C++ op `torch.ops.kiln.linear` (csrc/linear.cpp) where
it beats `F.linear`, `F.linear` everywhere else.

At batch-1 decode a linear layer streams its whole weight for one row of activations, so its speed is
the memory bandwidth it reaches. PyTorch's CPU GEMV streams weights larger than the last-level cache at
well under the machine's read bandwidth, bf16 ones especially; the op streams each weight once for all
rows and gets close to it (`python -m kiln.bench.linear` prints both beside the measured bandwidth).

`install_cpu_linears(model)` points every `nn.Linear` of a model, and its LM head, at `linear` from
outside, so the model code stays unchanged; `remove_cpu_linears(model)` undoes it. Training never
reaches the op: it has no backward, so anything that needs gradients runs `F.linear`.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from kiln.kernels.cpu_extension import avx2_paths, cpu_family, cpu_flags
from kiln.kernels.cpu_extension import cpu_ops_built as _op_built
from kiln.kernels.packed_weight import has_packed, packed, packed_linear, packed_rows, packing_available

# Most rows (product of x's leading dims) the op takes; above them torch's blocked GEMM is (or may be)
# faster. It depends on the paths the op was built with (-march=native: this CPU's flags) and on what
# torch's GEMM has. Measured with `python -m kiln.bench.linear` (2 threads, the 134M Llama's weights read
# from memory):
# - 2-core AVX512-BF16 AMD EPYC (no AMX): fp32 the op was 1.3-1.8x torch at 64 rows; bf16 1.3-2.0x at 16
#   rows, 0.96-1.4x at 24-32 and 0.9-1.0x from 48.
# - 2-vCPU Xeon with AMX (2026-12-06): bf16 1.5-2.6x at 1-4 rows, 0.87-1.12x at 8, 0.56-0.66x at 16 (torch's
#   oneDNN runs AMX tiles); fp32 1.1-3.1x up to 16 rows, 0.87-1.2x at 32, 0.70-1.07x at 64 (MKL).
# - A later Xeon with AMX (Emerald Rapids, 2026-12-06): bf16 the op 2.1-2.8x F.linear at 1 row, 1.5-1.9x at 4,
#   0.98-1.19x at 8, where oneDNN's GEMM on a weight packed once (packed_weight.py) is 1.2-2.1x F.linear, so
#   bf16 takes the op up to 4 rows on AMX CPUs (benchmarks/linear-emr.json).
# - 2-vCPU AMD EPYC Zen 3 (AVX2 + FMA, no AVX-512; 2026-12-06, the op's AVX2 tiles): fp32 1.2-4.1x at 1-16
#   rows, 0.93-1.8x at 32, 0.59-1.30x at 64, 0.52-0.89x at 256; bf16 1.2-1.4x at 1 row and 2.6-6.5x from 4
#   to 256 rows: without AVX512-BF16 torch's bf16 GEMM ran at 17-21 GFLOP/s at every size (its fp32 GEMM
#   at up to 150), so the op takes every bf16 linear, prefill included.
# - 2-vCPU AMD EPYC Zen 2 (family 23; same flags' paths as Zen 3; 2026-12-06): torch's fp32 GEMM ran at
#   73-101 GFLOP/s at 32-64 rows and 89-123 at 128 against the op's 106-135 at every row count: the op was
#   1.4-2.2x at 32 rows, 1.1-1.8x at 64, 0.94-1.5x at 128, 0.89-1.23x at 256 (only the down projection
#   below 1), so on family 23 the op takes fp32 up to 128 rows.
ALL_ROWS = 1 << 62


def _max_rows(
    flags: frozenset[str], cpu: tuple[str, int] = ("", 0), packing: bool = True
) -> dict[torch.dtype, int]:
    """The op's row limits by dtype for a CPU with these flags and (vendor, family) (cpu_family), where
    torch can (`packing`) or cannot pack bf16 weights for oneDNN (packed_weight.py)."""
    if "amx_bf16" in flags:
        return {torch.float32: 32, torch.bfloat16: 4}
    if avx2_paths(flags):
        fp32 = 128 if cpu == ("AuthenticAMD", 23) else 32
        return {torch.float32: fp32, torch.bfloat16: ALL_ROWS}
    # AVX512-BF16 without AMX (Zen 4, 2026-12-07, benchmarks/linear-zen4.json): from 4 rows oneDNN's GEMM on a
    # packed weight beat the op (packed_weight._packed_rows), so bf16 takes the op for 1-2 rows where torch
    # can pack.
    return {torch.float32: 64, torch.bfloat16: 2 if packing and "avx512_bf16" in flags else 16}


MAX_ROWS: dict[torch.dtype, int] = _max_rows(cpu_flags(), cpu_family(), packing_available())
# The limits for a weight without a packed copy (an engine that skipped packing for memory, a model outside
# the engine): F.linear is all that comes after the op there.
UNPACKED_MAX_ROWS: dict[torch.dtype, int] = _max_rows(cpu_flags(), cpu_family(), packing=False)


def op_rows(dtype: torch.dtype, packed: bool) -> int:
    """Most rows the op takes for a weight of `dtype` with (`packed`) or without a packed copy."""
    return (MAX_ROWS if packed else UNPACKED_MAX_ROWS)[dtype]


def op_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `linear` runs the C++ op for these tensors (else it runs F.linear)."""
    if x.dim() == 0 or x.device.type != "cpu" or x.dtype not in MAX_ROWS:
        return False
    if weight.dtype != x.dtype or weight.dim() != 2 or not weight.is_contiguous():
        return False  # a non-contiguous weight would be copied on every call
    if bias is not None and bias.dtype != x.dtype:
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    limit = MAX_ROWS[x.dtype]
    if limit < rows <= UNPACKED_MAX_ROWS[x.dtype] and not has_packed(weight):  # (asked only here: the
        limit = UNPACKED_MAX_ROWS[x.dtype]  # weight's __dict__ is not traceable by torch.compile)
    if not 0 < rows <= limit or x.shape[-1] == 0:
        return False
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # the op has no backward
    return _op_built()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x (..., K), weight (N, K): the C++ op for few rows, the weight's
    oneDNN-packed copy (packed_weight.py) for more where it has one, else torch."""
    if op_applies(x, weight, bias):
        rows = x.reshape(-1, x.shape[-1])  # (M, K)
        return _kiln_linear(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])
    copy = _packed_copy(x, weight, bias)
    if copy is None:
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    return packed_linear(rows, copy, bias).view(*x.shape[:-1], weight.shape[0])


def _packed_copy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """weight's packed copy where `linear` may use it for x, else None."""
    if not has_packed(weight) or x.dtype != weight.dtype or x.device.type != "cpu":
        return None
    if bias is not None and bias.dtype != x.dtype:
        return None
    if not 0 < x.numel() // max(x.shape[-1], 1) <= packed_rows(x.dtype):
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return None  # the packed op has no backward
    return packed(weight)


def _kiln_linear(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.kiln.linear(rows, weight, bias)


class CpuLinearForward:
    """An `nn.Linear`'s forward through `linear`, set as the module's instance attribute `forward`.

    Holds the module weakly, so the module -> forward -> module loop keeps nothing alive."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Linear) -> None:
        self.module = weakref.ref(module)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module()
        assert module is not None, "the Linear this forward belongs to is gone"
        return linear(x, module.weight, module.bias)


class CpuLogits:
    """A language model's `logits(hidden)` as `linear(hidden, model.output_weight)`: kiln's Transformer
    computes its LM head (tied or not) with F.linear on `output_weight`, not through an nn.Linear."""

    __slots__ = ("model",)

    def __init__(self, model: nn.Module) -> None:
        self.model = weakref.ref(model)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        model = self.model()
        assert model is not None, "the model these logits belong to is gone"
        return linear(hidden, model.output_weight)


def install_cpu_linears(model: nn.Module) -> int:
    """Route every plain `nn.Linear` in `model` (subclasses, e.g. quantized or adapter layers, keep their
    own forward) and the LM head of any module with `logits(hidden)` and `output_weight` (kiln's
    Transformer) through `linear`; returns how many forwards it routes. Harmless off CPU or without the
    op: `linear` then runs F.linear."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            if not isinstance(module.__dict__.get("forward"), CpuLinearForward):
                module.forward = CpuLinearForward(module)
            count += 1
        elif callable(getattr(type(module), "logits", None)) and _plain_head(module):
            if not isinstance(module.__dict__.get("logits"), CpuLogits):
                module.logits = CpuLogits(module)
            count += 1
    return count


def _plain_head(module: nn.Module) -> bool:
    """Whether a model's LM head is the plain `output_weight` matmul (tied, or an nn.Linear), not a
    replaced layer such as a quantized one, which keeps its own forward."""
    head = getattr(module, "lm_head", None)
    return hasattr(module, "output_weight") and (head is None or type(head) is nn.Linear)


def remove_cpu_linears(model: nn.Module) -> int:
    """Undo `install_cpu_linears`: each module runs its class's methods again; returns how many."""
    count = 0
    for module in model.modules():
        for name, kind in (("forward", CpuLinearForward), ("logits", CpuLogits)):
            if isinstance(module.__dict__.get(name), kind):
                delattr(module, name)
                count += 1
    return count
