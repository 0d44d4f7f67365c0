"""The two adapter methods' settings, as typed dataclasses validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import KilnError

# Short target names -> the kiln module each names inside a block.
LORA_TARGETS: dict[str, str] = {
    "q": "attn.q_proj",
    "k": "attn.k_proj",
    "v": "attn.v_proj",
    "o": "attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def parse_targets(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """'q,v' (or ['q', 'v'], or 'q_proj') -> ('q', 'v'); unknown names are a one-line error."""
    names = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for raw in names:
        name = raw.strip().removesuffix("_proj")
        if not name:
            continue
        if name not in LORA_TARGETS:
            raise KilnError(
                f"unknown LoRA target {raw.strip()!r}; choose from {','.join(LORA_TARGETS)}", param="targets"
            )
        if name not in out:
            out.append(name)
    if not out:
        raise KilnError(f"no LoRA targets given; choose from {','.join(LORA_TARGETS)}", param="targets")
    return tuple(out)


@dataclass(kw_only=True, slots=True)
class LoraConfig:
    """LoRA (Hu et al.): y = W x + (alpha / rank) * B A dropout(x), with A (rank, in), B (out, rank)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "v")
    use_rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank (PEFT's use_rslora)

    def __post_init__(self) -> None:
        self.targets = parse_targets(self.targets)
        if self.rank < 1:
            raise KilnError(f"LoRA rank must be >= 1, got {self.rank}", param="rank")
        if not 0 <= self.dropout < 1:
            raise KilnError(f"LoRA dropout must be in [0, 1), got {self.dropout}", param="dropout")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)


@dataclass(kw_only=True, slots=True)
class PromptTuningConfig:
    """Prompt tuning (Lester et al.): `num_virtual_tokens` trained embeddings prepended to every sequence,
    initialised from the embeddings of `init_text`'s tokens (repeated to length) or, without text, from
    the embeddings of random vocabulary tokens."""

    num_virtual_tokens: int = 20
    init_text: str | None = None

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise KilnError(
                f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}", param="num_virtual_tokens"
            )
