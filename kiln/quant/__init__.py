"""Quantized weights: int8 / int4 weight-only and w8a8 linear layers, their torch references, and the
compressed-tensors and GPTQ layouts they are stored in (no private format)."""

from kiln.quant.linear import QuantizedLinear
from kiln.quant.model import quantize_model, weight_bytes
from kiln.quant.scheme import SCHEMES, QuantScheme, parse_scheme

__all__ = ["SCHEMES", "QuantScheme", "QuantizedLinear", "parse_scheme", "quantize_model", "weight_bytes"]
