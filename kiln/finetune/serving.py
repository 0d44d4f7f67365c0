"""Many adapters served over one copy of the base weights, mixed freely within one forward pass.

LoRA: every linear some adapter targets becomes a `MultiLoRALinear`, which runs the base matmul once for
all rows and then, for each adapter present in the step, gathers that adapter's rows, applies its
low-rank pair (shrink x A^T, expand by B^T) and scatter-adds the result: the segmented gather matmul of
S-LoRA / Punica (SGMV) in plain torch ops. Rows of the base model (adapter 0) cost nothing extra.

Prompt tuning: each adapter's virtual tokens get their own ids past the vocabulary in one shared
`VirtualTokenEmbedding`; a request of that adapter has them prepended to its prompt, so they occupy KV
cache slots like prompt tokens and the prefix cache keys them like any other tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from kiln.errors import KilnError
from kiln.finetune.peft_format import AdapterWeights, read_adapter
from kiln.finetune.prompt_tuning import VirtualTokenEmbedding
from kiln.kernels.cpu_linear import linear

BASE = 0  # the adapter index of rows that run the plain base model


class AdapterRows:
    """The step's rows of each adapter, shared by every MultiLoRALinear of a model: adapter index ->
    (R,) row indices into the step's flattened (N, ...) batch, or None when that adapter has every row."""

    def __init__(self) -> None:
        self.rows: dict[int, torch.Tensor | None] = {}

    def set(self, adapter_per_row: Sequence[int], device: torch.device) -> None:
        ids = torch.tensor(adapter_per_row, dtype=torch.long)
        present = [int(a) for a in ids.unique().tolist() if a != BASE]
        if len(present) == 1 and bool((ids == present[0]).all()):
            self.rows = {present[0]: None}
            return
        self.rows = {a: torch.nonzero(ids == a)[:, 0].to(device) for a in present}

    def clear(self) -> None:
        self.rows = {}


class MultiLoRALinear(nn.Linear):
    """The base linear (same `weight`, `bias`) plus one (A (r, in), scaling * B (out, r)) pair per adapter
    index that targets it, applied to that adapter's rows of each step (see AdapterRows)."""

    def __init__(self, base: nn.Linear, rows: AdapterRows) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.adapter_rows = rows
        self.pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, index: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        weight = self.weight
        self.pairs[index] = (
            a.to(device=weight.device, dtype=weight.dtype).contiguous(),
            (b.float() * scaling).to(device=weight.device, dtype=weight.dtype).contiguous(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight, self.bias)  # (..., out): the base, once for every row
        active = [(i, r) for i, r in self.adapter_rows.rows.items() if i in self.pairs]
        if not active:
            return out
        flat_x = x.reshape(-1, x.shape[-1])  # (N, in)
        flat_out = out.reshape(-1, out.shape[-1])  # (N, out): a view of the fresh output
        for index, rows in active:
            a, b = self.pairs[index]
            if rows is None:
                flat_out += (flat_x @ a.t()) @ b.t()
            else:
                flat_out.index_add_(0, rows, (flat_x.index_select(0, rows) @ a.t()) @ b.t())  # (R, out)
        return flat_out.view(out.shape)


class ServedAdapters:
    """Named PEFT adapters (LoRA and prompt tuning) installed on one base model for serving."""

    def __init__(self, model: nn.Module, adapters: Mapping[str, str | Path | AdapterWeights]) -> None:
        self.model = model
        self.rows = AdapterRows()
        self.index: dict[str, int] = {}
        self.methods: dict[str, str] = {}
        self.virtual_ids: dict[str, list[int]] = {}
        self.sources: dict[str, str] = {}
        prompts: list[torch.Tensor] = []
        for position, (name, source) in enumerate(adapters.items(), start=1):
            if not name or "=" in name:
                raise KilnError(f"adapter name {name!r} is not valid; use a plain name such as 'sql'")
            adapter = source if isinstance(source, AdapterWeights) else read_adapter(source)
            self.index[name], self.methods[name], self.sources[name] = (
                position,
                adapter.method,
                adapter.source,
            )
            if adapter.method == "lora":
                self._add_lora(position, adapter)
            else:
                first = model.config.vocab_size + sum(p.shape[0] for p in prompts)
                prompts.append(adapter.check_prompt(model))
                self.virtual_ids[name] = list(range(first, first + prompts[-1].shape[0]))
        if prompts:
            model.embed_tokens = VirtualTokenEmbedding(model.embed_tokens, torch.cat(prompts))

    def _add_lora(self, index: int, adapter: AdapterWeights) -> None:
        for module_name, (a, b) in adapter.lora_for(self.model).items():
            layer = self.model.get_submodule(module_name)
            if not isinstance(layer, MultiLoRALinear):
                parent_name, _, child = module_name.rpartition(".")
                layer = MultiLoRALinear(layer, self.rows)
                setattr(self.model.get_submodule(parent_name), child, layer)
            layer.add(index, a, b, adapter.scaling)

    @property
    def names(self) -> list[str]:
        return list(self.index)

    def adapter_index(self, name: str | None) -> int:
        """The index of adapter `name` (BASE for None); an unknown name is a one-line error."""
        if name is None:
            return BASE
        if name not in self.index:
            served = ", ".join(self.index) or "none"
            raise KilnError(f"unknown adapter {name!r}; this engine serves adapters: {served}", param="model")
        return self.index[name]
