"""`kiln quantize DIR OUT`: an HF model directory -> a compressed-tensors quantized one (vLLM, transformers
with compressed-tensors, and kiln read it)."""

from __future__ import annotations

from pathlib import Path

import torch

from kiln.errors import KilnError
from kiln.models.hf.io import copy_tokenizer_files, load_model, save_model
from kiln.quant import QuantizedLinear, QuantScheme, quantize_model, weight_bytes


def quantize_dir(source: str | Path, target: str | Path, scheme: QuantScheme) -> tuple[int, int, int]:
    """Quantize every Linear of `source` round-to-nearest under `scheme` and write `target`; returns
    (layers quantized, weight bytes before, after)."""
    model = load_model(source)
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise KilnError(f"{source} is already quantized; quantize the unquantized model instead")
    before = weight_bytes(model)
    with torch.no_grad():
        count = quantize_model(model, scheme)
    save_model(model, target)
    copy_tokenizer_files(source, target)
    return count, before, weight_bytes(model)
