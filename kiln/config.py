"""ModelConfig: the one description of a decoder-only transformer that every kiln path reads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from kiln.errors import KilnError

PositionKind = Literal["learned", "rope", "alibi"]
NormKind = Literal["layernorm", "rmsnorm"]
MlpKind = Literal["plain", "gated"]
Activation = Literal["gelu", "gelu_tanh", "silu", "relu"]
RopeScalingKind = Literal["linear", "llama3"]
AttentionPattern = Literal["dense", "bigbird"]


@dataclass(kw_only=True, slots=True, frozen=True)
class RopeScaling:
    """Context extension for RoPE. `linear` divides all frequencies by `factor`; `llama3` is Llama 3.1's
    wavelength-dependent scheme (low frequencies scaled, high kept, smooth in between)."""

    kind: RopeScalingKind
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "llama3"):
            raise KilnError(f"rope scaling kind {self.kind!r} is not supported; use 'linear' or 'llama3'")
        if self.factor <= 0:
            raise KilnError(f"rope scaling factor must be > 0, got {self.factor}")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Shape and flavour of a decoder-only transformer.

    Attention kind follows from head counts: `num_kv_heads == num_heads` is multi-head,
    `num_kv_heads == 1` multi-query, anything between grouped-query.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None  # None = num_heads (multi-head attention)
    head_dim: int | None = None  # None = hidden_size // num_heads
    intermediate_size: int | None = None  # None = 4 * hidden (plain) or Llama's 8/3 rule rounded (gated)
    max_position_embeddings: int = 2048

    position: PositionKind = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None  # keys further back than this many tokens are not attended
    # "bigbird": block-sparse causal attention (kiln/models/bigbird.py): each block of bigbird_block_size
    # queries attends its window blocks (its own and the ones before), the global blocks at the start and
    # random earlier blocks (seeded, fixed per layer).
    attention_pattern: AttentionPattern = "dense"
    bigbird_block_size: int = 64
    bigbird_num_window_blocks: int = 3
    bigbird_num_global_blocks: int = 1
    bigbird_num_random_blocks: int = 1
    bigbird_seed: int = 0

    norm: NormKind = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: MlpKind = "gated"
    activation: Activation = "silu"

    qkv_bias: bool = False
    out_bias: bool = False  # attention output projection
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    embedding_norm: bool = False  # BLOOM normalises the token embeddings before the first block
    qk_norm: bool = False  # RMSNorm over each head's q and k (head_dim wide) before RoPE (Qwen3)

    # Mixture of experts (kiln/models/moe.py). num_experts = 0: every layer has the dense MLP.
    num_experts: int = 0
    num_experts_per_token: int = 2  # top-k experts each token is routed to
    moe_intermediate_size: int | None = None  # of each routed expert; None = intermediate_size
    router_renormalize: bool = True  # rescale the top-k probabilities to sum to 1 (Mixtral; Qwen's option)
    num_shared_experts: int = 0  # experts every token goes through (Qwen-MoE, DeepSeek-MoE), fused as one MLP
    shared_expert_intermediate_size: int | None = None  # all shared experts together; None = n * moe size
    shared_expert_gate: bool = False  # Qwen-MoE: sigmoid(w . x) scales the shared experts' output per token
    dense_layers: list[int] = field(default_factory=list)  # layers that keep the dense MLP (Qwen-MoE)
    router_aux_loss_coef: float = 0.01  # Switch/Mixtral load-balancing loss weight, added in training
    router_z_loss_coef: float = 0.0  # ST-MoE router z-loss weight (mean squared logsumexp of router logits)

    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    # The Hugging Face family this model is saved as. kiln's own models use the Llama layout.
    family: str = "llama"
    # HF config keys kiln does not interpret, carried through load -> save unchanged.
    extra_hf_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise KilnError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                    "pick sizes that divide or set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.intermediate_size is None:
            self.intermediate_size = _default_intermediate_size(self.hidden_size, self.mlp)
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.shared_expert_intermediate_size is None:
            self.shared_expert_intermediate_size = self.num_shared_experts * self.moe_intermediate_size
        self.dense_layers = sorted(set(self.dense_layers))
        self._validate()
        self._validate_moe()

    def _validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise KilnError(f"{name} must be positive, got {getattr(self, name)}")
        if self.intermediate_size <= 0 or self.max_position_embeddings <= 0:
            raise KilnError("intermediate_size and max_position_embeddings must be positive")
        if self.num_heads % self.num_kv_heads:
            raise KilnError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads}) "
                "for grouped-query attention"
            )
        _check_choice("position", self.position, ("learned", "rope", "alibi"))
        _check_choice("norm", self.norm, ("layernorm", "rmsnorm"))
        _check_choice("mlp", self.mlp, ("plain", "gated"))
        _check_choice("activation", self.activation, ("gelu", "gelu_tanh", "silu", "relu"))
        if self.position == "rope":
            if self.head_dim % 2:
                raise KilnError(f"RoPE needs an even head_dim, got {self.head_dim}")
            if self.rope_theta <= 0:
                raise KilnError(f"rope_theta must be > 0, got {self.rope_theta}")
        elif self.rope_scaling is not None:
            raise KilnError(f"rope_scaling is set but position is {self.position!r}, not 'rope'")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise KilnError(f"sliding_window must be positive or None, got {self.sliding_window}")
        if self.norm_eps <= 0:
            raise KilnError(f"norm_eps must be > 0, got {self.norm_eps}")
        _check_choice("attention_pattern", self.attention_pattern, ("dense", "bigbird"))
        if self.attention_pattern == "bigbird":
            if self.bigbird_block_size <= 0 or self.bigbird_num_window_blocks <= 0:
                raise KilnError("bigbird_block_size and bigbird_num_window_blocks must be positive")
            if self.bigbird_num_global_blocks < 0 or self.bigbird_num_random_blocks < 0:
                raise KilnError("bigbird_num_global_blocks and bigbird_num_random_blocks must be >= 0")
            if self.sliding_window is not None or self.position == "alibi":
                raise KilnError("attention_pattern='bigbird' replaces sliding_window and ALiBi; unset them")

    def _validate_moe(self) -> None:
        if self.num_experts < 0 or self.num_experts == 1:
            raise KilnError(f"num_experts must be 0 (dense) or at least 2, got {self.num_experts}")
        if self.num_experts and not 1 <= self.num_experts_per_token <= self.num_experts:
            raise KilnError(
                f"num_experts_per_token must be between 1 and num_experts ({self.num_experts}), "
                f"got {self.num_experts_per_token}"
            )
        if self.moe_intermediate_size <= 0 or self.shared_expert_intermediate_size < 0:
            raise KilnError("moe_intermediate_size must be positive and shared_expert_intermediate_size >= 0")
        if self.num_experts and self.mlp != "gated":
            raise KilnError("mixture-of-experts layers use gated experts; set mlp='gated'")
        if any(not 0 <= i < self.num_layers for i in self.dense_layers):
            raise KilnError(
                f"dense_layers must index layers 0..{self.num_layers - 1}, got {self.dense_layers}"
            )

    def is_moe_layer(self, layer_index: int) -> bool:
        return self.num_experts > 0 and layer_index not in self.dense_layers

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Exact parameter count of the model this config builds."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        norm = h * (2 if self.norm == "layernorm" else 1)
        attn = h * (q + 2 * kv) + q * h
        attn += (q + 2 * kv) * self.qkv_bias + h * self.out_bias + 2 * d * self.qk_norm
        num_mlp_in = 2 if self.mlp == "gated" else 1
        mlp = num_mlp_in * h * self.intermediate_size + self.intermediate_size * h
        mlp += (num_mlp_in * self.intermediate_size + h) * self.mlp_bias
        num_moe = self.num_moe_layers
        total = self.num_layers * (attn + 2 * norm) + (self.num_layers - num_moe) * mlp + norm
        total += num_moe * self._moe_layer_parameters(self.num_experts)
        if include_embeddings:
            total += self.vocab_size * h
            total += 0 if self.tie_word_embeddings else self.vocab_size * h
            total += self.max_position_embeddings * h if self.position == "learned" else 0
            total += norm if self.embedding_norm else 0
        return total

    def num_active_parameters(self, include_embeddings: bool = True) -> int:
        """Parameters one token runs through: the top-k routed experts of each MoE layer, not all of them."""
        idle = self.num_moe_layers * (
            self._moe_layer_parameters(self.num_experts)
            - self._moe_layer_parameters(self.num_experts_per_token)
        )
        return self.num_parameters(include_embeddings) - idle

    def _moe_layer_parameters(self, num_routed: int) -> int:
        """Router, `num_routed` experts, the shared experts and their gate of one MoE layer."""
        h = self.hidden_size
        total = self.num_experts * h + num_routed * 3 * h * self.moe_intermediate_size
        total += 3 * h * self.shared_expert_intermediate_size + h * self.shared_expert_gate
        return total

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        values = dict(values)
        if isinstance(values.get("rope_scaling"), dict):
            values["rope_scaling"] = RopeScaling(**values["rope_scaling"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KilnError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes: Any) -> ModelConfig:
        # Derived MoE sizes follow the fields they derive from unless given too.
        if "num_shared_experts" in changes or "moe_intermediate_size" in changes:
            changes.setdefault("shared_expert_intermediate_size", None)
        if "intermediate_size" in changes and self.moe_intermediate_size == self.intermediate_size:
            changes.setdefault("moe_intermediate_size", None)
        return dataclasses.replace(self, **changes)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise KilnError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _default_intermediate_size(hidden_size: int, mlp: str) -> int:
    if mlp == "plain":
        return 4 * hidden_size
    # Llama's rule: 2/3 of 4h keeps gated-MLP parameters equal to a plain 4h MLP; round up to 64.
    return 64 * ((int(8 * hidden_size / 3) + 63) // 64)


def _llama_preset(hidden: int, layers: int, heads: int, kv_heads: int, vocab: int = 8192) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )


# Named presets: Llama layout (RMSNorm, RoPE, SwiGLU, GQA). Parameter counts include embeddings.
PRESETS: dict[str, ModelConfig] = {
    "tiny": _llama_preset(hidden=64, layers=2, heads=4, kv_heads=2, vocab=1024),  # ~0.2M: tests
    "demo": _llama_preset(hidden=256, layers=6, heads=8, kv_heads=4),  # ~6M: the default demo model
    "small": _llama_preset(hidden=512, layers=8, heads=8, kv_heads=4, vocab=32000),  # ~51M
    "base": _llama_preset(hidden=1024, layers=16, heads=16, kv_heads=8, vocab=32000),  # ~221M
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset (see `PRESETS`), with fields overridden by keyword."""
    if name not in PRESETS:
        raise KilnError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
