"""Triton, imported when installed, and what every kernel file shares.

Kernel files write `@triton.jit` / `@triton.autotune(...)` at module level; without triton those
decorators are inert stand-ins, so the torch references beside the kernels import and run anyway
(`kiln.kernels.runtime.use_triton` refuses to launch a kernel before one could be called).
"""

from __future__ import annotations

import torch

from kiln.kernels.runtime import interpreted

try:
    import triton
    import triton.language as tl
except ImportError:  # the `gpu` extra is not installed

    class _Inert:
        """Stands in for the `triton` module at import time only."""

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(*_, **__):
            return lambda fn: fn

        @staticmethod
        def Config(*_, **__):  # noqa: N802 (mirrors triton.Config)
            return None

    triton = _Inert()
    tl = None

# Triton's interpreter gets tl.dot wrong for bf16 operands; kernels cast dot operands to fp32 there.
DOT_IN_FP32 = interpreted()


def autotuned(kernel, configs: list, key: list[str]):
    """`kernel` autotuned over `configs` on a GPU; under the interpreter the launcher passes one config
    itself (timing interpreted kernels would only cost minutes)."""
    if interpreted():
        return None
    return triton.autotune(configs=configs, key=key)(kernel)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands get true fp32 products ("ieee"), as the torch references compute; 16-bit ones use
    tensor cores either way."""
    return "ieee" if dtype == torch.float32 else "tf32"
