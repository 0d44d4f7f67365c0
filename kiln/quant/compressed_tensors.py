"""The compressed-tensors layout (vLLM's and transformers' `quant_method: "compressed-tensors"`), read and
written without the compressed-tensors package (it is the tests' oracle only).

Per quantized Linear `P` the checkpoint holds, beside the usual unquantized tensors:
- int8 (`naive-quantized` / `int-quantized`, also `pack-quantized` with 8 bits): `P.weight` int8 (N, K),
  `P.weight_scale` (N, 1) in the model dtype; w = q * scale.
- int4 `pack-quantized`: `P.weight_packed` int32 (N, ceil(K / 8)), eight 4-bit values per word, element i
  at bits 4 * (i % 8), each stored as q + 8 (q in [-8, 7]); `P.weight_scale` (N, K / group);
  `P.weight_shape` int64 [N, K]; with zero points (symmetric false) `P.weight_zero_point` int32
  (ceil(N / 8), K / group), zero points q-style in [-8, 7] packed the same way along the output dim;
  w = (q - zero_point) * scale.
The `quantization_config` names the scheme in `config_groups` (weights: num_bits, strategy channel or
group, group_size, symmetric; w8a8 adds dynamic per-token int8 input_activations).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kiln.errors import ModelLoadError
from kiln.quant.linear import QuantizedLinear
from kiln.quant.scheme import QuantScheme

FORMATS = {"int8": "naive-quantized", "int4": "pack-quantized", "w8a8": "int-quantized"}
READABLE_FORMATS = ("naive-quantized", "int-quantized", "pack-quantized")
Read = Callable[[str], torch.Tensor]


def quantization_config(scheme: QuantScheme, ignore: list[str]) -> dict[str, Any]:
    """config.json's `quantization_config` for a model whose Linears (but `ignore`) use `scheme`."""
    grouped = scheme.name == "int4"
    weights = {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": scheme.symmetric,
        "group_size": scheme.group_size if grouped else None,
        "strategy": "group" if grouped else "channel",
        "dynamic": False,
        "observer": "minmax",
    }
    activations = None
    if scheme.name == "w8a8":
        activations = {
            "num_bits": 8,
            "type": "int",
            "symmetric": True,
            "group_size": None,
            "strategy": "token",
            "dynamic": True,
            "observer": None,
        }
    group = {
        "targets": ["Linear"],
        "weights": weights,
        "input_activations": activations,
        "output_activations": None,
        "format": FORMATS[scheme.name],
    }
    return {
        "quant_method": "compressed-tensors",
        "format": FORMATS[scheme.name],
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, C) integers in [0, 2^bits) -> (R, ceil(C * bits / 32)) int32, element i at bit bits * i."""
    per_word = 32 // bits
    rows, columns = values.shape
    padded = torch.zeros(rows, -(-columns // per_word) * per_word, dtype=torch.int64)
    padded[:, :columns] = values.to(torch.int64)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (padded.view(rows, -1, per_word) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """The inverse of `pack_int32`: (R, words) int32 -> (R, columns) int64 in [0, 2^bits)."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    values = (packed.to(torch.int64)[..., None] >> shifts) & (2**bits - 1)
    return values.reshape(packed.shape[0], -1)[:, :columns]


def to_compressed(layer: QuantizedLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The layer's tensors under their compressed-tensors suffixes (scales in `dtype`)."""
    scale = layer.scale.to(dtype).contiguous()
    if layer.scheme.name != "int4":
        return {"weight": layer.qweight.clone(), "weight_scale": scale}
    out = {
        "weight_packed": pack_int32(layer.integer_weight(), 4),
        "weight_scale": scale,
        "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
    }
    if not layer.scheme.symmetric:
        out["weight_zero_point"] = pack_int32(layer.zero.T, 4).T.contiguous()  # packed along N
    return out


def scheme_of(config: dict[str, Any], source: str) -> tuple[QuantScheme, str]:
    """The QuantScheme (one config group) and format of a compressed-tensors `quantization_config`."""
    groups = list(config.get("config_groups", {}).values())
    if len(groups) != 1 or not isinstance(groups[0], dict):
        raise ModelLoadError(f"{source}: kiln reads compressed-tensors configs with one config group")
    group = groups[0]
    form = group.get("format") or config.get("format")
    weights, activations = group.get("weights") or {}, group.get("input_activations")
    bits, strategy = weights.get("num_bits"), weights.get("strategy")
    if form not in READABLE_FORMATS or weights.get("type") != "int":
        raise ModelLoadError(f"{source}: compressed-tensors format {form!r} is not one kiln reads")
    try:
        if bits == 8 and strategy == "channel" and weights.get("symmetric", True):
            dynamic_tokens = (
                activations and activations.get("strategy") == "token" and activations.get("dynamic")
            )
            if activations is not None and not dynamic_tokens:
                raise ModelLoadError(f"{source}: only dynamic per-token int8 activations are supported")
            return QuantScheme(name="w8a8" if activations else "int8"), form
        if bits == 4 and strategy == "group":
            group_size = weights.get("group_size")
            return QuantScheme(
                name="int4", group_size=group_size, symmetric=weights.get("symmetric", True)
            ), form
    except ModelLoadError:
        raise
    except ValueError as error:
        raise ModelLoadError(f"{source}: {error}") from None
    raise ModelLoadError(
        f"{source}: {bits}-bit {strategy} weights are not a scheme kiln runs (int8 per channel, "
        "int4 per group, w8a8)"
    )


def from_compressed(prefix: str, scheme: QuantScheme, form: str, read: Read) -> QuantizedLinear:
    """Build the QuantizedLinear of module `prefix` from its stored tensors (`read(name)`)."""
    scale = read(f"{prefix}.weight_scale").float()
    if scheme.name != "int4":
        if form == "pack-quantized":
            packed = read(f"{prefix}.weight_packed")
            rows, columns = (int(v) for v in read(f"{prefix}.weight_shape"))
            q = (unpack_int32(packed, 8, columns) - 128).to(torch.int8)
        else:
            q = read(f"{prefix}.weight")
        _check(prefix, "weight", q.dtype == torch.int8 and q.dim() == 2, f"int8 (N, K), got {q.dtype}")
        _check(prefix, "weight_scale", tuple(scale.shape) == (q.shape[0], 1), f"({q.shape[0]}, 1)")
        return QuantizedLinear.from_integers(q, scale, scheme, name=prefix)
    rows, columns = (int(v) for v in read(f"{prefix}.weight_shape"))
    packed = read(f"{prefix}.weight_packed")
    _check(
        prefix,
        "weight_packed",
        tuple(packed.shape) == (rows, -(-columns // 8)),
        f"({rows}, {columns // 8}) int32",
    )
    groups = columns // scheme.group_size
    _check(prefix, "weight_scale", tuple(scale.shape) == (rows, groups), f"({rows}, {groups})")
    u = unpack_int32(packed, 4, columns)
    zero = None
    if not scheme.symmetric:
        packed_zero = read(f"{prefix}.weight_zero_point")
        _check(prefix, "weight_zero_point", packed_zero.shape[1] == groups, f"(N / 8, {groups})")
        zero = unpack_int32(packed_zero.T.contiguous(), 4, rows).T
    return QuantizedLinear.from_integers(u, scale, scheme, zero, name=prefix)


def _check(prefix: str, suffix: str, ok: bool, expected: str) -> None:
    if not ok:
        raise ModelLoadError(
            f"tensor {prefix}.{suffix!s} is malformed: expected {expected}; the checkpoint is corrupt"
        )
