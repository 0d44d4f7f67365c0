"""Reading user-given sizes, dtypes and devices ("512MB", "bf16", "auto"): one place for every layer.

A bottom-layer module (beside `config` and `errors`): it imports only torch and kiln.errors.
"""

from __future__ import annotations

import re

import torch

from kiln.errors import KilnError, ModelLoadError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as '5GB', '500MB', '64KiB'."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ModelLoadError(f"cannot read size {size!r}; write it like 5GB, 500MB or 1048576")
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    return int(float(match.group(1)) * units[(match.group(2) or "b").lower()])


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a name such as 'bf16'; None and 'auto' mean: keep the checkpoint's dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device from a name; "auto" is cuda when a GPU is available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KilnError(f"device {str(device)!r} requested but no CUDA GPU is available; use device='cpu'")
    return device
