"""QuantizedLinear: an `nn.Linear` replacement holding int8 or packed int4 weights (QuantScheme).

`reference(x)` is the definition: weight-only schemes dequantize the weight to x's dtype and run
F.linear; w8a8 quantizes x per token and multiplies the integers exactly (float64), then scales.
`forward(x)` runs the fast path where one applies and the reference elsewhere:
- weight-only, few rows on CPU (decode): kiln's C++ op `torch.ops.kiln.quant_linear`
  (kernels/csrc/quant_linear.cpp), which streams the integer weight once with dequantization folded
  into the sums. PyTorch's `_weight_int8pack_mm` was slower than kiln's bf16 linear at batch 1;
  `_weight_int4pack_mm_for_cpu` matched or beat kiln's int4 op on some shapes but needs bf16 scales
  (not exact against this reference); both were far slower than dequantize + GEMM at 64 rows
  (BENCHMARKS.md, "Quantized weights").
- w8a8, few rows on VNNI CPUs: the same op on the integer activations, then the per-token scale; more
  rows, or any number without VNNI: exact int32 sums (int8 x int8) from oneDNN's int8 GEMM on the weight
  packed once by the engine (kernels/packed_weight.py; `torch._int_mm` where it is not packed) or kiln's
  `torch.ops.kiln.int8_mm` (kernels/csrc/int8_mm.cpp, AVX2; the same integers). Where kiln's C++ ops are
  built, these run inside one op, `torch.ops.kiln.w8a8_linear` (kernels/csrc/w8a8_linear.cpp), with the
  activation quantization: the same ATen kernels in the same order, one Python call instead of fifteen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.kernels.cpu_extension import avx2_paths, cpu_flags, cpu_ops_built
from kiln.kernels.cpu_linear import ALL_ROWS
from kiln.kernels.packed_weight import packed
from kiln.quant import weights as qw
from kiln.quant.scheme import QuantScheme


# Most rows the C++ op takes; above them the reference (weight-only: dequantize + torch's GEMM) or
# exact integer sums (w8a8) run. `kiln bench quant` on AVX-512 EPYCs and an AMX Xeon timed 1 row (op faster)
# and 64 (op 3-7x slower than the GEMM); 16 is kiln's bf16 linear threshold, not tuned separately. On a
# Zen 3 EPYC (AVX2, no AVX-512, no VNNI; 2026-12-06) at 64 rows the op (int8 2.8-2.9 ms for the 768 x
# 2048 layers) beat torch's bf16 GEMM behind the reference (9.4-11.2 ms) and torch._int_mm (34 ms, no VNNI)
# several times over, so there the op takes every row count of bf16 x. w8a8's integer sums come from
# torch._int_mm where VNNI is present and from kiln::int8_mm (AVX2 vpmaddwd, the same int32) where it is
# not: on the Zen 3 (2026-12-07, 2 threads) int8_mm took 1.6-2.0x less time than the op on the integer rows
# at 16-64 rows and 0.86-1.13x at 1-4, so without VNNI w8a8 takes int8_mm at every row count.
def _op_row_limits(flags: frozenset[str]) -> tuple[dict[torch.dtype, int], int, bool]:
    """(weight-only limits by x dtype, the w8a8 limit, whether w8a8 sums with kiln::int8_mm above it) for a
    CPU with these flags."""
    vnni = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)
    weight_only = {torch.float32: 16, torch.bfloat16: ALL_ROWS if avx2_paths(flags) else 16}
    return weight_only, 16 if vnni else 0, not vnni


MAX_OP_ROWS, W8A8_MAX_OP_ROWS, W8A8_KILN_INT8_MM = _op_row_limits(cpu_flags())


class QuantizedLinear(nn.Module):
    """y = x @ W.T + b with W stored quantized. Build with `from_float` or `from_integers`."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, name: str = "") -> None:
        super().__init__()
        self.in_features, self.out_features, self.scheme, self.name = in_features, out_features, scheme, name
        groups = 1 if scheme.name != "int4" else in_features // scheme.group_size
        if scheme.name == "int4":
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("zero", torch.zeros(out_features, groups, dtype=torch.uint8))
            self.register_buffer("offset", torch.zeros(out_features, groups))  # scale * zero, for the op
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("zero", None)
            self.register_buffer("offset", None)
        self.register_buffer("scale", torch.ones(out_features, groups))
        self.register_buffer("bias", None)

    @classmethod
    def from_integers(
        cls,
        q: torch.Tensor,
        scale: torch.Tensor,
        scheme: QuantScheme,
        zero: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        name: str = "",
    ) -> QuantizedLinear:
        """From integer weights: int8 q (N, K) in [-127, 127], or int4 u (N, K) in [0, 15] with zero."""
        out_features, in_features = q.shape
        scheme.check_shape(f"{name}.weight" if name else "weight", out_features, in_features)
        layer = cls(in_features, out_features, scheme, name)
        layer.scale = scale.float().reshape(out_features, -1).contiguous()
        if scheme.name == "int4":
            zero = torch.full_like(layer.scale, 8) if zero is None else zero
            layer.zero = zero.to(torch.uint8).reshape(layer.scale.shape).contiguous()
            layer.qweight = qw.pack_int4(q)
            layer.offset = layer.scale * layer.zero.float()
        else:
            layer.qweight = q.to(torch.int8).contiguous()
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, scheme: QuantScheme, name: str = ""
    ) -> QuantizedLinear:
        """Quantize a float (N, K) weight round-to-nearest under `scheme`."""
        weight = weight.detach()
        scheme.check_shape(f"{name}.weight" if name else "weight", *weight.shape)
        if scheme.name == "int4":
            u, scale, zero = qw.quantize_int4(weight, scheme.group_size, scheme.symmetric)
            return cls.from_integers(u, scale, scheme, zero, bias, name)
        q, scale = qw.quantize_int8(weight)
        return cls.from_integers(q, scale, scheme, None, bias, name)

    # ------------------------------------------------------------------------------------ weights

    def integer_weight(self) -> torch.Tensor:
        """(N, K): int8 values, or int4's unsigned values in [0, 15]."""
        return qw.unpack_int4(self.qweight) if self.scheme.name == "int4" else self.qweight

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return qw.dequantize(self.integer_weight(), self.scale, self.zero).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.describe()}"

    # ------------------------------------------------------------------------------------ compute

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The scheme's definition in plain torch (see the module docstring)."""
        if self.scheme.name != "w8a8":
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantized_weight(x.dtype), bias)
        q, x_scale = qw.quantize_rows(x.reshape(-1, self.in_features))
        sums = q.double() @ self.qweight.double().T  # exact integer sums
        y = sums * x_scale.double() * self.scale.double().T
        return self._finish(y.to(x.dtype), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(self.in_features, 1)
        if self.scheme.name == "w8a8":
            if self._cpu_op_applies(x, rows):  # the two paths below, in one call from Python
                y = torch.ops.kiln.w8a8_linear(
                    x.reshape(rows, self.in_features),
                    self.qweight,
                    self.scale,
                    self.bias,
                    W8A8_MAX_OP_ROWS,
                    W8A8_KILN_INT8_MM,
                    packed(self.qweight) if rows > W8A8_MAX_OP_ROWS else None,
                )
                return y.view(*x.shape[:-1], self.out_features)
            # Without kiln's C++ ops: torch._int_mm only where it is fast (VNNI), as the op's own choice.
            if x.device.type == "cpu" and rows > W8A8_MAX_OP_ROWS and not W8A8_KILN_INT8_MM:
                q, x_scale = qw.quantize_rows(x.reshape(rows, self.in_features))
                sums = torch._int_mm(q, self.qweight.T)  # (M, N) int32
                return self._finish((sums.float() * x_scale * self.scale.T).to(x.dtype), x)
            return self.reference(x)
        if self._cpu_op_applies(x, rows, MAX_OP_ROWS.get(x.dtype, 0)):
            y = torch.ops.kiln.quant_linear(
                x.reshape(rows, self.in_features),
                self.qweight,
                self.scale,
                self.offset,
                self.bias,
                self.scheme.bits,
            )
            return y.view(*x.shape[:-1], self.out_features)
        return self.reference(x)

    def packable_weights(self) -> tuple[torch.Tensor, ...]:
        """Weights kiln/kernels/packed_weight.py may keep a oneDNN copy of (`pack_linears`): w8a8's int8
        weight, for its integer GEMMs above the op's rows on AMX CPUs."""
        return (self.qweight,) if self.scheme.name == "w8a8" else ()

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(M, N) -> x's leading shape, plus the bias."""
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def _cpu_op_applies(self, x: torch.Tensor, rows: int, max_rows: int | None = None) -> bool:
        """Whether kiln's C++ ops take `rows` rows of x (any number when max_rows is None)."""
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
            return False
        if rows <= 0 or (max_rows is not None and rows > max_rows):
            return False
        if torch.is_grad_enabled() and x.requires_grad:
            return False
        return cpu_ops_built()
