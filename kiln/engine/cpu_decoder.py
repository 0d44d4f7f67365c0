"""Whole decoder layers in one C++ call for the engine's decode steps on CPU.

`install_cpu_decoder_layers(model)` points each Llama-style block of a kiln Transformer (RMSNorm, SwiGLU MLP,
plain linears) at `CpuDecoderForward`, from outside, so the model code stays unchanged. When a step holds
only decodes on the C++ paged attention backend (`CppPagedAttention.decode_step`; Loki's backend sets one
too, which only the whole-stack call below takes), the block runs as
`kiln::decoder_layer` (kiln/kernels/cpu_decoder_layer.py): the same registered ops as the Python forward,
called from C++, equal to it bit for bit (`kiln::decoder_layer_quantized` over an int8/int4 KV pool).
Projections quantized weight-only (kiln/quant int8/int4) run there too, on the op QuantizedLinear uses for
as many rows (MAX_OP_ROWS for its dtype), and w8a8 projections on kiln::w8a8_linear as QuantizedLinear calls
it (any number of rows); larger steps of a weight-only layer, and anything else (prompts, chunks, training,
adapter layers) run the block's own forward. Where every block fits, the model's layer loop
(`Transformer.run_layers`) is `CpuDecoderLayers`: a decode step in which every layer takes
the op runs them all in one `kiln::decoder_layers` call (one Python call a step instead of one a layer).
"""

from __future__ import annotations

import weakref
from itertools import chain

import torch
from torch import nn

from kiln.kernels.cpu_decoder_layer import (
    W8A8_BITS,
    LayerStack,
    LayerWeights,
    decoder_layer,
    decoder_layer_quantized,
    decoder_layers,
)
from kiln.kernels.cpu_linear import MAX_ROWS, op_rows
from kiln.kernels.packed_weight import packed, weight_version
from kiln.models.layers import MLP, AttentionInputs, RMSNorm
from kiln.models.transformer import Block, Transformer
from kiln.quant.linear import MAX_OP_ROWS, W8A8_KILN_INT8_MM, W8A8_MAX_OP_ROWS, QuantizedLinear

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _modules(block: Block) -> list[nn.Module]:
    """[attn_norm, mlp_norm, q, k, v, o, gate, up, down], straight from the modules' dicts
    (nn.Module.__getattr__ costs microseconds a call, and a decode step asks for these every layer)."""
    attn, mlp = block.attn._modules, block.mlp._modules
    return (
        [block._modules["attn_norm"], block._modules["mlp_norm"]]
        + [attn[name] for name in _PROJECTIONS]
        + [mlp[name] for name in _MLP_PROJECTIONS]
    )


def _linears(block: Block) -> list[nn.Module]:
    return _modules(block)[2:]


def _weight_only(linear: nn.Module) -> bool:
    return type(linear) is QuantizedLinear and linear.scheme.name in ("int8", "int4")


def _w8a8(linear: nn.Module) -> bool:
    return type(linear) is QuantizedLinear and linear.scheme.name == "w8a8"


def fits(block: nn.Module) -> bool:
    """Whether `block` has the layer the op computes: kiln's Block with RMSNorms, a SwiGLU MLP and plain
    nn.Linear or quantized (int8, int4, w8a8) projections (adapter layers keep their own forward)."""
    if type(block) is not Block or type(block.mlp) is not MLP or not block.mlp.swiglu:
        return False
    if block.attn.q_norm is not None:  # q/k-norm (Qwen3) is not in the C++ layer
        return False
    if type(block.attn_norm) is not RMSNorm or type(block.mlp_norm) is not RMSNorm:
        return False
    return all(
        type(linear) is nn.Linear or _weight_only(linear) or _w8a8(linear) for linear in _linears(block)
    )


def layer_weights(block: Block) -> LayerWeights:
    linears = _linears(block)
    # (weight, bits, scale, offset) per projection: the integer weight and its scales where quantized
    parts = [
        (linear.qweight, linear.scheme.bits, linear.scale, linear.offset)
        if _weight_only(linear)
        else (linear.qweight, W8A8_BITS, linear.scale, None)
        if _w8a8(linear)
        else (linear.weight, 0, None, None)
        for linear in linears
    ]
    q, k, v, o, gate, up, down = (part[0] for part in parts)
    return LayerWeights(
        attn_norm=block.attn_norm.weight, q=q, k=k, v=v, o=o, mlp_norm=block.mlp_norm.weight,
        gate=gate, up=up, down=down, biases=tuple(linear.bias for linear in linears), eps=block.attn_norm.eps,
        bits=tuple(part[1] for part in parts), scales=tuple(part[2] for part in parts),
        offsets=tuple(part[3] for part in parts),
        packed=tuple(packed(part[0]) if part[1] in (0, W8A8_BITS) else None for part in parts),
        w8a8_max_op_rows=W8A8_MAX_OP_ROWS, w8a8_int8_mm=W8A8_KILN_INT8_MM,
    )  # fmt: skip


def _parameters(block: Block) -> list:
    """Every module and tensor the op reads (compared by identity each call to see a replaced one)."""
    modules = _modules(block)
    found: list = list(modules)
    for module in modules:
        found += [module._parameters.get("weight"), module._parameters.get("bias")]
        if module._buffers:  # a QuantizedLinear's integer weight, scale, offset and bias
            found += list(module._buffers.values())
    return found


def _rope_rows(inputs: AttentionInputs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The step's RoPE cos/sin as (rows, head_dim), as the layer ops take them (None without RoPE)."""
    if inputs.cos is None:
        return None, None
    head_dim = inputs.cos.shape[-1]
    return inputs.cos.reshape(-1, head_dim), inputs.sin.reshape(-1, head_dim)


class CpuDecoderForward:
    """A Block's forward, set as the module's instance attribute `forward`: the C++ layer for a step of
    decodes, the class's forward otherwise. Holds the block weakly (no module -> forward -> module loop).

    The layer's weights are gathered once and reused while the block keeps the same modules and tensors
    (checked by identity every call, so a linear replaced later, e.g. quantized, is seen)."""

    __slots__ = ("block", "_seen", "_held", "_layer", "_max_rows", "_versions")

    def __init__(self, block: Block) -> None:
        self.block = weakref.ref(block)
        self._seen: tuple[int, ...] = ()
        self._held: list = []  # the objects of `_seen`, kept alive so that no new object takes their ids
        self._layer: LayerWeights | None = None
        self._max_rows = 0  # most rows the layer's quantized projections take in the op (no limit: 0)
        self._versions: tuple[int, ...] = ()  # versions of the weights with packed copies in _layer

    def __call__(self, x: torch.Tensor, inputs: AttentionInputs, kv_cache=None) -> torch.Tensor:
        block = self.block()
        assert block is not None, "the Block this forward belongs to is gone"
        step = getattr(inputs.backend, "decode_step", None)
        if step is not None and step.loki_basis is not None:  # Loki runs in decoder_layers only
            step = None
        layer = None if step is None or kv_cache is not None else self._layer_for(block, x)
        if layer is None:
            return Block.forward(block, x, inputs, kv_cache)
        pool, index = inputs.backend.pool, block.attn.layer_index
        cos, sin = _rope_rows(inputs)
        limit = op_rows(x.dtype, self._versions != ())  # kiln's op, then the packed copies where made
        if pool.bits:
            caches = (pool.keys[index], pool.values[index], pool.key_params[index], pool.value_params[index])
            rows = decoder_layer_quantized(
                x.reshape(-1, x.shape[-1]), layer, cos, sin, caches, pool.bits, step, limit
            )
            return rows.view(x.shape)
        rows = decoder_layer(
            x.reshape(-1, x.shape[-1]), layer, cos, sin, pool.keys[index], pool.values[index], step, limit
        )
        return rows.view(x.shape)

    def _layer_for(self, block: Block, x: torch.Tensor) -> LayerWeights | None:
        """The layer's weights when the op applies to `x`, else None."""
        if x.device.type != "cpu" or x.dtype not in MAX_ROWS or torch.is_grad_enabled():
            return None
        found = _parameters(block)
        seen = tuple(map(id, found))  # compared as ints: one C-level tuple comparison
        # Packed copies serve only steps of more rows than kiln's op (bf16) or w8a8's op takes: only those
        # check their versions.
        stale = self._versions and x.numel() // x.shape[-1] > min(MAX_ROWS[x.dtype], W8A8_MAX_OP_ROWS)
        if seen != self._seen or (stale and self._versions != self._packed_versions()):
            self._seen, self._held = seen, found
            self._layer = layer_weights(block) if fits(block) else None
            # weight-only projections run kiln::quant_linear (up to MAX_OP_ROWS rows); w8a8 any number
            quantized = self._layer is not None and any(bits > 0 for bits in self._layer.bits)
            self._max_rows = MAX_OP_ROWS.get(self._layer.attn_norm.dtype, 16) if quantized else 0
            self._versions = self._packed_versions()
        layer = self._layer
        if layer is None or layer.attn_norm.dtype != x.dtype:
            return None
        return None if self._max_rows and x.numel() // x.shape[-1] > self._max_rows else layer

    def _packed_versions(self) -> tuple[int, ...]:
        """The in-place versions of the weights `_layer` holds packed copies of (a weight changed in place
        since is packed again when `_layer` is rebuilt)."""
        layer = self._layer
        if layer is None or not any(p is not None for p in layer.packed):
            return ()
        weights = (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down)
        return tuple(weight_version(w) for w, p in zip(weights, layer.packed, strict=True) if p is not None)


class CpuDecoderLayers:
    """A Transformer's `run_layers`, set as the model's instance attribute: a step of decodes (over a float
    or quantized pool) in which every block takes the C++ layer (its CpuDecoderForward finds its weights for
    this step) runs all layers in one `kiln::decoder_layers` call, the same ops in the same order as the
    blocks one by one, so the same bits; any other step runs the blocks in turn. At batch-1 decode of the
    134M shape the per-block Python (module call, weight checks, argument lists) cost ~0.2-0.6 ms of a
    5-7 ms token.

    Once a step has found every layer, later steps of as few rows in the same dtype reuse what it found while
    nothing the layers are built from was replaced: the module, parameter and buffer dicts of every block are
    read back as one tuple of object ids (a C-level pass; the per-block checks it stands for took ~0.1 ms a
    step at batch 1), and the objects are held so that no new object takes an old id."""

    __slots__ = ("model", "_stack", "_ids", "_dicts", "_held", "_seen", "_fast")

    def __init__(self, model: Transformer) -> None:
        self.model = weakref.ref(model)
        self._stack: LayerStack | None = None
        self._ids: tuple[int, ...] = ()  # ids of the LayerWeights _stack was built from
        self._dicts: list[dict] = []  # the dicts whose values _seen snapshots
        self._held: tuple = ()  # their values at the snapshot, kept alive
        self._seen: tuple[int, ...] = ()  # ids of _held
        self._fast: tuple[torch.dtype, int, list[int]] | None = None  # (dtype, most rows, limits) reusable

    def __call__(self, x: torch.Tensor, inputs: AttentionInputs, kv_cache=None) -> torch.Tensor:
        model = self.model()
        assert model is not None, "the Transformer these layers belong to is gone"
        step = getattr(inputs.backend, "decode_step", None)
        if step is not None and kv_cache is None:
            found = self._layers(model, x)
            if found is not None:
                stack, limits = found
                pool, caches, bases = inputs.backend.pool, [], []
                for block in model.layers._modules.values():
                    i = block.attn.layer_index
                    caches += (pool.keys[i], pool.values[i])
                    if pool.bits:
                        caches += (pool.key_params[i], pool.value_params[i])
                    if step.loki_basis is not None:
                        bases.append(step.loki_basis[i])
                cos, sin = _rope_rows(inputs)
                rows = decoder_layers(
                    x.reshape(-1, x.shape[-1]), stack, cos, sin, caches, pool.bits, step, limits, bases
                )
                return rows.view(x.shape)
        return Transformer.run_layers(model, x, inputs, kv_cache)

    def _layers(self, model: Transformer, x: torch.Tensor) -> tuple[LayerStack, list[int]] | None:
        """Each layer's weights and small-row limit for this step; None where a block does not take the op."""
        fast = self._fast
        if (
            fast is not None
            and fast[0] == x.dtype
            and x.numel() // x.shape[-1] <= fast[1]
            and x.device.type == "cpu"
            and not torch.is_grad_enabled()
            and tuple(map(id, self._snapshot())) == self._seen
        ):
            return self._stack, fast[2]
        self._fast = None
        layers, limits, forwards = [], [], []
        for block in model.layers._modules.values():
            forward = block.__dict__.get("forward")
            if type(forward) is not CpuDecoderForward:
                return None
            layer = forward._layer_for(block, x)
            if layer is None:
                return None
            layers.append(layer)
            limits.append(op_rows(x.dtype, forward._versions != ()))
            forwards.append(forward)
        if not layers:
            return None
        ids = tuple(map(id, layers))
        if ids != self._ids:
            if not LayerStack.takes(tuple(layers)):
                return None
            self._stack, self._ids = LayerStack.of(tuple(layers)), ids
        # Up to these rows each block's _layer_for answers from its weights alone (no packed-copy versions to
        # compare, no quantized projection past its op's rows), so an unchanged snapshot gives this answer.
        most = min([MAX_ROWS[x.dtype], W8A8_MAX_OP_ROWS] + [f._max_rows for f in forwards if f._max_rows])
        self._dicts = _watched_dicts(model)
        self._held = self._snapshot()
        self._seen = tuple(map(id, self._held))
        self._fast = (x.dtype, most, limits)
        return self._stack, limits

    def _snapshot(self) -> tuple:
        forwards = [block.__dict__.get("forward") for block in self._dicts[0].values()]
        return tuple(chain(forwards, chain.from_iterable(map(dict.values, self._dicts))))


def _watched_dicts(model: Transformer) -> list[dict]:
    """The dicts holding what `_parameters` compares block by block: the blocks, their norms and projections,
    and those modules' parameters and buffers (the blocks' installed forwards are compared beside them)."""
    dicts: list[dict] = [model.layers._modules]
    for block in model.layers._modules.values():
        dicts += [block._modules, block.attn._modules, block.mlp._modules]
        for module in _modules(block):
            dicts += [module._parameters, module._buffers]
    return dicts


def install_cpu_decoder_layers(model: Transformer) -> int:
    """Route every block of `model` that `fits` through `CpuDecoderForward`, and the model's layer loop
    through `CpuDecoderLayers` where every block fits; returns how many blocks. Call it only where kiln's C++
    CPU ops are built (the engine's kernels="auto" on CPU)."""
    count = 0
    for block in model.layers:
        if fits(block):
            if not isinstance(block.__dict__.get("forward"), CpuDecoderForward):
                block.forward = CpuDecoderForward(block)
            count += 1
    if (
        count
        and count == len(model.layers)
        and not isinstance(model.__dict__.get("run_layers"), CpuDecoderLayers)
    ):
        model.run_layers = CpuDecoderLayers(model)
    return count
