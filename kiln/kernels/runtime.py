"""The kernel switch: `kernels="torch" | "triton" | "auto"` picks an op's torch code or its Triton kernel.

`auto` is Triton on CUDA tensors (when triton is installed) and torch everywhere else. `triton` insists on
the Triton kernels: on a CUDA tensor, or on CPU under `TRITON_INTERPRET=1` (Triton's interpreter; slow,
for tests). Triton is an optional dependency (the `gpu` extra), imported only when a kernel runs.
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

from kiln.errors import KilnError

KernelChoice = Literal["torch", "triton", "auto"]
KERNEL_CHOICES: tuple[str, ...] = ("torch", "triton", "auto")


def check_kernels(kernels: str) -> str:
    if kernels not in KERNEL_CHOICES:
        raise KilnError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}; got {kernels!r}")
    return kernels


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreted() -> bool:
    """Whether Triton kernels run in its CPU interpreter (read by triton when kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(kernels: str, tensor: torch.Tensor) -> bool:
    """Whether an op on `tensor` runs its Triton kernel under the switch `kernels`."""
    if kernels == "torch":
        return False
    if kernels == "auto":
        return tensor.is_cuda and triton_available()
    if kernels != "triton":
        check_kernels(kernels)
    if not triton_available():
        raise KilnError("kernels='triton' needs the triton package: pip install 'kiln[gpu]'")
    if not tensor.is_cuda and not interpreted():
        raise KilnError(
            f"kernels='triton' needs CUDA tensors (got a {tensor.device.type} tensor); use kernels='auto', "
            "or set TRITON_INTERPRET=1 before starting Python to interpret the kernels on CPU (slow)"
        )
    return True
