"""HF GPTQ int4 checkpoints (auto-gptq / optimum / gptqmodel, `quant_method: "gptq"`) into QuantizedLinear.

Per Linear `P`: `P.qweight` int32 (K / 8, N), eight 4-bit values of consecutive input features per word
(feature 8 * i + j at bits 4 * j of row i); `P.qzeros` int32 (G, N / 8), zero points packed the same way
along the outputs; `P.scales` (G, N); `P.g_idx` (K,) the group of each input feature. w = (u - z) * s,
where the stored zero is z - 1 in the v1 `gptq` checkpoint format (the usual one) and z in `gptq_v2`.
Act-order checkpoints (g_idx not k // group_size) are refused: kiln's int4 layer keeps groups contiguous.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.errors import ModelLoadError
from kiln.quant.compressed_tensors import Read, unpack_int32
from kiln.quant.linear import QuantizedLinear
from kiln.quant.scheme import QuantScheme


def scheme_of(config: dict[str, Any], source: str) -> QuantScheme:
    bits, group_size = config.get("bits"), config.get("group_size")
    if bits != 4:
        raise ModelLoadError(f"{source}: GPTQ with {bits} bits is not supported; kiln reads 4-bit GPTQ")
    try:
        return QuantScheme(name="int4", group_size=group_size, symmetric=bool(config.get("sym", True)))
    except ValueError as error:
        raise ModelLoadError(f"{source}: {error}") from None


def zero_offset(config: dict[str, Any]) -> int:
    """What to add to a stored zero point: 1 in the v1 format, 0 in gptq_v2."""
    return 0 if config.get("checkpoint_format", "gptq") == "gptq_v2" else 1


def from_gptq(prefix: str, scheme: QuantScheme, read: Read, offset: int) -> QuantizedLinear:
    qweight, qzeros, scales = read(f"{prefix}.qweight"), read(f"{prefix}.qzeros"), read(f"{prefix}.scales")
    in_features, out_features = qweight.shape[0] * 8, qweight.shape[1]
    groups = in_features // scheme.group_size
    expected = {"qzeros": (groups, -(-out_features // 8)), "scales": (groups, out_features)}
    for suffix, tensor in (("qzeros", qzeros), ("scales", scales)):
        if tuple(tensor.shape) != expected[suffix]:
            raise ModelLoadError(
                f"tensor {prefix}.{suffix} has shape {list(tensor.shape)}, expected {list(expected[suffix])} "
                f"for qweight {list(qweight.shape)} and group size {scheme.group_size}; the checkpoint is "
                "corrupt"
            )
    g_idx_name = f"{prefix}.g_idx"
    try:
        g_idx = read(g_idx_name)
    except KeyError:
        g_idx = None
    if g_idx is not None and not torch.equal(
        g_idx.to(torch.int64), torch.arange(in_features) // scheme.group_size
    ):
        raise ModelLoadError(f"tensor {g_idx_name}: act-order (desc_act) GPTQ is not supported by kiln")
    u = unpack_int32(qweight.T.contiguous(), 4, in_features)  # (N, K)
    zero = unpack_int32(qzeros, 4, out_features).T + offset  # (N, G)
    if (zero > 15).any():
        raise ModelLoadError(f"tensor {prefix}.qzeros holds a zero point past 15; the checkpoint is corrupt")
    return QuantizedLinear.from_integers(u, scales.float().T, scheme, zero, name=prefix)
