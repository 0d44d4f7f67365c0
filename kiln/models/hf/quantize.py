"""`kiln quantize DIR OUT`: an HF model directory -> a compressed-tensors quantized one (vLLM, transformers
with compressed-tensors, and kiln read it); GPTQ for int4 and SmoothQuant for w8a8 from calibration text."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kiln.errors import KilnError
from kiln.models.hf.io import copy_tokenizer_files, load_model, save_model
from kiln.models.layers import MLP
from kiln.models.transformer import Block, Transformer
from kiln.quant import QuantizedLinear, QuantScheme, quantize_model, weight_bytes
from kiln.quant.calibration import collect_hessians, collect_input_maxima
from kiln.quant.smoothing import SmoothGroup, check_alpha, smooth


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


def _smooth_group(producer_name: str, producer: nn.Module, consumers: list[tuple[str, nn.Module]]):
    """The SmoothGroup of `producer` (a norm, or a linear whose output rows feed the consumers), or None
    when a consumer is not a plain nn.Linear (already quantized, or an adapter layer)."""
    if not all(type(linear) is nn.Linear for _, linear in consumers):
        return None
    producers = [producer.weight] + ([producer.bias] if getattr(producer, "bias", None) is not None else [])
    names = ", ".join(name.rsplit(".", 1)[-1] for name, _ in consumers)
    return SmoothGroup(f"{producer_name} -> {names}", tuple(consumers), tuple(producers))


def smoothing_groups(model: Transformer) -> list[SmoothGroup]:
    """SmoothQuant's groups in kiln's pre-norm blocks: attn_norm -> q/k/v, mlp_norm -> gate/up, and in a
    gated MLP up -> down (down reads act(gate) * up, linear in up's rows). MoE layers are left alone (the
    router reads mlp_norm's output too), as is o_proj (its input is a mix of v's heads)."""
    groups = []
    for index, block in enumerate(model.layers):
        if type(block) is not Block:
            continue
        prefix, attn, mlp = f"layers.{index}", block.attn, block.mlp
        qkv = [(f"{prefix}.attn.{name}", getattr(attn, name)) for name in ("q_proj", "k_proj", "v_proj")]
        groups.append(_smooth_group(f"{prefix}.attn_norm", block.attn_norm, qkv))
        if type(mlp) is MLP:
            inputs = ["gate_proj", "up_proj"] if mlp.gate_proj is not None else ["up_proj"]
            reading = [(f"{prefix}.mlp.{name}", getattr(mlp, name)) for name in inputs]
            groups.append(_smooth_group(f"{prefix}.mlp_norm", block.mlp_norm, reading))
            if mlp.gate_proj is not None and type(mlp.up_proj) is nn.Linear:
                down = [(f"{prefix}.mlp.down_proj", mlp.down_proj)]
                groups.append(_smooth_group(f"{prefix}.mlp.up_proj", mlp.up_proj, down))
    return [group for group in groups if group is not None]


def quantize_dir(
    source: str | Path,
    target: str | Path,
    scheme: QuantScheme,
    calibration: list[Path] | None = None,
    calibration_tokens: int = 2048,
    smooth_alpha: float | None = None,
) -> tuple[int, int, int]:
    """Quantize every Linear of `source` under `scheme` and write `target`: round to nearest, or GPTQ
    for int4 with `calibration` text files; for w8a8 with `smooth_alpha`, SmoothQuant first (kiln.quant.
    smoothing; needs `calibration`). Returns (layers quantized, weight bytes before, after)."""
    if smooth_alpha is not None:
        if scheme.name != "w8a8":
            raise KilnError(
                f"--smooth-alpha is for w8a8 (it moves activation outliers into the weights); {scheme.name} "
                "leaves activations unquantized"
            )
        if not calibration:
            raise KilnError("--smooth-alpha needs --calibration text files to measure the activations on")
        check_alpha(smooth_alpha)
    model = load_model(source)  # in its stored dtype, which the quantized dir keeps for what stays float
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise KilnError(f"{source} is already quantized; quantize the unquantized model instead")
    before = weight_bytes(model)
    hessians = None
    if calibration and scheme.name == "int4":
        hessians = collect_hessians(model, calibration_batches(source, calibration, calibration_tokens))
    if smooth_alpha is not None:
        maxima = collect_input_maxima(model, calibration_batches(source, calibration, calibration_tokens))
        smooth(smoothing_groups(model), maxima, smooth_alpha)
    with torch.no_grad():
        count = quantize_model(model, scheme, hessians=hessians)
    save_model(model, target)
    copy_tokenizer_files(source, target)
    return count, before, weight_bytes(model)
