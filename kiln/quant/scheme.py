"""QuantScheme: what a quantized linear stores and computes.

- int8: int8 weights, one symmetric scale per output channel; activations stay 16/32-bit (W8A16).
- int4: 4-bit weights in groups of `group_size` input features (32, 64 or 128), one scale per group and,
  unless `symmetric`, one zero point per group; round to nearest (W4A16).
- w8a8: int8 weights per output channel and int8 activations, one scale per token computed on the fly
  (dynamic, ZeroQuant); integer matmul, int32 sums.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import KilnError

SCHEMES = ("int8", "int4", "w8a8")
INT4_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True, kw_only=True, slots=True)
class QuantScheme:
    name: str  # int8, int4 or w8a8
    group_size: int | None = None  # int4 only: input features per scale
    symmetric: bool = True  # int4 only: False stores a zero point per group

    def __post_init__(self) -> None:
        if self.name not in SCHEMES:
            raise KilnError(f"unknown quantization scheme {self.name!r}; choose one of {', '.join(SCHEMES)}")
        if self.name == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise KilnError(
                f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, "
                f"got {self.group_size}"
            )
        if self.name != "int4" and (self.group_size is not None or not self.symmetric):
            raise KilnError(
                f"{self.name} is symmetric per output channel; group size and zero points are int4's"
            )

    @property
    def bits(self) -> int:
        return 4 if self.name == "int4" else 8

    def check_shape(self, name: str, out_features: int, in_features: int) -> None:
        """Refuse a weight this scheme cannot take, naming the tensor."""
        if self.name == "int4" and in_features % self.group_size:
            raise KilnError(
                f"{name}: int4 group size {self.group_size} does not divide its {in_features} input "
                f"features; pick a group size that does (32, 64 or 128) or leave this layer unquantized"
            )

    def describe(self) -> str:
        if self.name != "int4":
            return self.name
        return f"int4 g{self.group_size}" + ("" if self.symmetric else " zero-point")


def parse_scheme(
    name: str | QuantScheme, group_size: int | None = None, symmetric: bool = True
) -> QuantScheme:
    """A QuantScheme from its name; int4 defaults to group size 128."""
    if isinstance(name, QuantScheme):
        return name
    if name == "int4" and group_size is None:
        group_size = 128
    return QuantScheme(name=name, group_size=group_size, symmetric=symmetric)
