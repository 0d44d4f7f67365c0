"""`kiln quantize DIR OUT`: an HF model directory -> a compressed-tensors quantized one (vLLM, transformers
with compressed-tensors, and kiln read it)."""

from __future__ import annotations

from pathlib import Path

import torch

from kiln.errors import KilnError
from kiln.models.hf.io import copy_tokenizer_files, load_model, save_model
from kiln.quant import QuantizedLinear, QuantScheme, quantize_model, weight_bytes
from kiln.quant.calibration import collect_hessians


def calibration_batches(source: str | Path, files: list[Path], num_tokens: int, window: int = 256):
    """The first `num_tokens` tokens of `files` (text, in the model's tokenizer) as (B, <= window) batches."""
    from kiln.tokenizer import Tokenizer

    if not (Path(source) / "tokenizer.json").is_file():
        raise KilnError(f"{source} has no tokenizer.json, which calibration needs to read its text files")
    tokenizer = Tokenizer.from_dir(source)
    ids: list[int] = []
    for file in files:
        ids += tokenizer.encode(Path(file).read_text(errors="replace"))
        if len(ids) >= num_tokens:
            break
    if len(ids) < 16:
        raise KilnError(f"the calibration files hold {len(ids)} tokens; give at least a few hundred")
    tokens = torch.tensor(ids[:num_tokens])
    return [chunk[None] for chunk in tokens.split(window)]


def quantize_dir(
    source: str | Path,
    target: str | Path,
    scheme: QuantScheme,
    calibration: list[Path] | None = None,
    calibration_tokens: int = 2048,
) -> tuple[int, int, int]:
    """Quantize every Linear of `source` under `scheme` and write `target`: round to nearest, or GPTQ
    for int4 with `calibration` text files. Returns (layers quantized, weight bytes before, after)."""
    model = load_model(source)  # in its stored dtype, which the quantized dir keeps for what stays float
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise KilnError(f"{source} is already quantized; quantize the unquantized model instead")
    before = weight_bytes(model)
    hessians = None
    if calibration and scheme.name == "int4":
        hessians = collect_hessians(model, calibration_batches(source, calibration, calibration_tokens))
    with torch.no_grad():
        count = quantize_model(model, scheme, hessians=hessians)
    save_model(model, target)
    copy_tokenizer_files(source, target)
    return count, before, weight_bytes(model)
