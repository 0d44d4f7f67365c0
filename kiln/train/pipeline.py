"""Pipeline parallelism from outside the model (torch.distributed.pipelining).

The layers are split into `pp x pp_virtual_stages` consecutive stages, balanced by parameter count (or
as `pp_stage_layers` says). Pipeline rank r runs stages r, r + pp, r + 2 pp, ... (one stage per rank
for 1F1B and GPipe; `pp_virtual_stages` of them, looped, for interleaved 1F1B). Each rank keeps a pruned
copy of the single-device Transformer holding only its stages' modules: the blocks stay under
`layers.<global index>` (a ModuleDict), embeddings on the rank of the first stage, the final norm and
LM head on the rank of the last, so a rank's state dict uses the same fully-qualified names as the whole
model and DCP checkpoints reshape freely between pipeline layouts.

Tied embeddings: the rank of the last stage holds its own copy of the (V, H) embedding table as the LM
head weight (under the same name, `embed_tokens.weight`). Both copies start equal (one seeded model is
pruned on every rank); after each backward the two ranks all-reduce (sum) the copies' gradients, so both
hold the gradient one process computes for the shared weight and the optimizer keeps them equal, as
Megatron-LM does with its embedding group. The copy on the last stage is left out of the global gradient
norm so the shared weight counts once.

The last stage computes the fused linear + cross-entropy (or, under --tp, vocab-parallel cross-entropy)
inside its forward, where FSDP has the head weight unsharded. Each micro-batch's loss is its summed
cross-entropy times `loss_scale` (set per step to dp_size / (global kept targets x grad_accum_steps)),
so gradients summed over micro-batches equal one process's mean over the global batch, Goldfish-dropped
targets included.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    PipelineScheduleSingle,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from kiln.errors import KilnError
from kiln.models.transformer import Transformer, default_positions
from kiln.train.losses import IGNORE_INDEX
from kiln.train.objective import cross_entropy

SCHEDULES = ("1f1b", "interleaved-1f1b", "gpipe")


def num_microbatches(config) -> int:
    """config.pp_microbatches, or pp when left at 0."""
    return config.pp_microbatches or config.pp


def check_pipeline_config(config) -> None:
    """One-line errors for pipeline settings that cannot run (a TrainConfig with pp > 1 or pp options)."""
    pp, virtual, schedule = config.pp, config.pp_virtual_stages, config.pp_schedule
    if pp < 1 or virtual < 1 or config.pp_microbatches < 0:
        raise KilnError(
            f"need pp >= 1, pp_virtual_stages >= 1 and pp_microbatches >= 0 (0 = pp); got pp={pp}, "
            f"pp_virtual_stages={virtual}, pp_microbatches={config.pp_microbatches}"
        )
    if schedule not in SCHEDULES:
        raise KilnError(f"pp_schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    if pp == 1:
        raise KilnError("pp_virtual_stages and pp_stage_layers need --pp > 1 (a pipeline to split)")
    if (schedule == "interleaved-1f1b") != (virtual > 1):
        raise KilnError(
            "interleaved-1f1b runs several stages per rank: use it with --pp-virtual-stages >= 2, and "
            f"1f1b or gpipe with --pp-virtual-stages 1 (got {schedule} with {virtual})"
        )
    microbatches = num_microbatches(config)
    if schedule != "gpipe" and microbatches < pp:
        raise KilnError(
            f"{schedule} needs at least pp={pp} micro-batches to fill the pipeline; got "
            f"pp_microbatches={microbatches}: raise --pp-microbatches or use --pp-schedule gpipe"
        )
    if schedule == "interleaved-1f1b" and microbatches % pp:
        raise KilnError(f"interleaved-1f1b needs pp_microbatches a multiple of pp={pp}; got {microbatches}")
    if config.batch_size % microbatches:
        raise KilnError(
            f"batch_size={config.batch_size} (sequences per data-parallel rank) must split evenly into "
            f"pp_microbatches={microbatches}; choose a batch_size that is a multiple of it"
        )
    stage_layer_counts(config.model, pp * virtual, config.pp_stage_layers)


def stage_layer_counts(model_config, num_stages: int, explicit: str = "") -> list[int]:
    """Layers per stage: as `explicit` ("3,5") says, else contiguous runs that minimise the largest
    stage's parameter count, counting the embeddings on the first stage and the head on the last."""
    num_layers = model_config.num_layers
    if num_layers < num_stages:
        raise KilnError(
            f"{num_stages} pipeline stages (pp x pp_virtual_stages) need at least {num_stages} layers; the "
            f"model has {num_layers}: lower --pp / --pp-virtual-stages"
        )
    if explicit:
        try:
            counts = [int(part) for part in explicit.split(",")]
        except ValueError:
            raise KilnError(f"pp_stage_layers must be comma-separated layer counts: {explicit!r}") from None
        if len(counts) != num_stages or sum(counts) != num_layers or min(counts) < 1:
            raise KilnError(
                f"pp_stage_layers={explicit!r} must give {num_stages} stages >= 1 layer each, summing to "
                f"num_layers={num_layers}"
            )
        return counts
    layer, first, last = _parameter_costs(model_config)
    return _balanced_counts([layer] * num_layers, first, last, num_stages)


def _parameter_costs(model_config) -> tuple[int, int, int]:
    """(parameters per block, extra on the first stage, extra on the last) of a model config."""
    with torch.device("meta"):
        model = Transformer(model_config)
    layer = sum(p.numel() for p in model.layers[0].parameters())
    first = model.embed_tokens.weight.numel()
    first += sum(p.numel() for p in model.embed_positions.parameters()) if model.embed_positions else 0
    last = model.output_weight.numel() + sum(p.numel() for p in model.norm.parameters())
    return layer, first, last


def _balanced_counts(costs: list[int], first: int, last: int, num_stages: int) -> list[int]:
    """Split `costs` (one per layer) into `num_stages` contiguous runs of >= 1 minimising the largest run's
    total (+ `first` on the first run, + `last` on the last); dynamic programming over split points."""
    num_layers = len(costs)
    prefix = [0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    infinity = float("inf")
    # best[s][n]: the smallest max-cost of splitting the first n layers into s stages, and its split point
    best = [[(infinity, 0)] * (num_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0, 0)
    for stages in range(1, num_stages + 1):
        for end in range(stages, num_layers - (num_stages - stages) + 1):
            for start in range(stages - 1, end):
                cost = prefix[end] - prefix[start] + (first if stages == 1 else 0)
                cost += last if stages == num_stages else 0
                candidate = max(best[stages - 1][start][0], cost)
                if candidate < best[stages][end][0]:
                    best[stages][end] = (candidate, start)
    counts, end = [], num_layers
    for stages in range(num_stages, 0, -1):
        start = best[stages][end][1]
        counts.append(end - start)
        end = start
    return counts[::-1]


class StageLayers(nn.ModuleDict):
    """A stage's blocks keyed by their index in the whole model ("3" -> layers.3.*), iterated in order."""

    def __iter__(self):
        return iter(self.values())


class _ModelRef:
    """Holds the rank's Transformer without registering it as a submodule of a stage."""

    def __init__(self, model: Transformer) -> None:
        self.model = model


class StageModule(nn.Module):
    """One pipeline stage: forward(x, targets) -> the next stage's input, or on the last stage the
    micro-batch's loss. x is the token ids (B, T) on the first stage, else the hidden states (B, T, H)
    (B, T/tp, H) under sequence parallelism. `targets` (B, T) reach every stage (the schedule hands its
    keyword arguments to all); stages before the last use only their shape, for positions."""

    def __init__(self, model: Transformer, layer_indices: list[int], is_first: bool, is_last: bool) -> None:
        super().__init__()
        self.is_first, self.is_last = is_first, is_last
        self.embed_tokens = model.embed_tokens if is_first or (is_last and model.lm_head is None) else None
        self.embed_positions = model.embed_positions if is_first else None
        self.embed_norm = model.embed_norm if is_first else None
        self.layers = StageLayers({str(i): model.layers[str(i)] for i in layer_indices})
        self.norm = model.norm if is_last else None
        self.lm_head = model.lm_head if is_last else None
        self._model = _ModelRef(model)
        self.loss_scale = 1.0  # set per step by Pipeline.step
        self.vocab_parallel = False
        self.kernels = "torch"

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        model = self._model.model
        batch, length = targets.shape
        positions = default_positions(batch, length, 0, None, targets.device)
        if self.is_first:
            x = self.embed_tokens(x)
            if self.embed_positions is not None:
                x = x + self.embed_positions(positions)
            if self.embed_norm is not None:
                x = self.embed_norm(x)
        inputs = model._attention_inputs(positions, None, 0, x.dtype)
        for block in self.layers:
            x = block(x, inputs)
        if not self.is_last:
            return x
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        kept = (targets != IGNORE_INDEX).sum()
        mean = cross_entropy(self.norm(x), weight, targets, self.vocab_parallel, self.kernels)
        loss = mean * (kept * self.loss_scale) if kept else mean.nan_to_num() * 0
        return loss.to_local() if hasattr(loss, "to_local") else loss  # a replicated DTensor under TP


def _loss_is_output(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return output  # the last stage already computed the loss


@dataclass
class Pipeline:
    """This rank's stages and the schedule that runs them; built by `split_model`, finished by `start`."""

    model: Transformer  # the pruned model: this rank's modules under whole-model names
    modules: list[StageModule]
    stage_indices: list[int]
    num_stages: int
    pp_rank: int
    pp_size: int
    schedule_name: str
    microbatches: int
    tied_group: dist.ProcessGroup | None = None
    schedule: PipelineScheduleSingle | PipelineScheduleMulti | None = None
    stages: list[PipelineStage] = field(default_factory=list)

    @property
    def holds_last_stage(self) -> bool:
        return self.num_stages - 1 in self.stage_indices

    @property
    def holds_tied_copy(self) -> bool:
        """The LM head here is a copy of the embedding that the first stage's rank also holds."""
        return self.tied_group is not None and self.holds_last_stage and 0 not in self.stage_indices

    def start(
        self,
        device: torch.device,
        group: dist.ProcessGroup,
        *,
        microbatch_size: int,
        seq_len: int,
        tp: int,
        hidden_dtype: torch.dtype,
    ) -> None:
        """Build the PipelineStages (after TP/FSDP have been applied to the modules) and the schedule.

        Every stage's input and output shapes are given (static mode), not inferred by a meta-device
        forward, which gets sequence-parallel shapes wrong: token ids (mb, T) into the first stage,
        hidden states (mb, T/tp, H) between stages, a scalar loss out of the last."""
        hidden = self.model.config.hidden_size
        activation = torch.empty(
            microbatch_size, seq_len // tp, hidden, dtype=hidden_dtype, device="meta", requires_grad=True
        )
        ids = torch.empty(microbatch_size, seq_len, dtype=torch.long, device="meta")
        loss = torch.empty((), dtype=torch.float32, device="meta", requires_grad=True)
        self.stages = [
            PipelineStage(
                module,
                index,
                self.num_stages,
                device,
                input_args=ids if index == 0 else activation,
                output_args=loss if index == self.num_stages - 1 else activation,
                output_grads=None if index == self.num_stages - 1 else activation,
                input_grads=None if index == 0 else activation,
                group=group,
            )
            for module, index in zip(self.modules, self.stage_indices, strict=True)
        ]
        if self.schedule_name == "interleaved-1f1b":
            self.schedule = ScheduleInterleaved1F1B(
                self.stages, self.microbatches, loss_fn=_loss_is_output, scale_grads=False
            )
            return
        kind = Schedule1F1B if self.schedule_name == "1f1b" else ScheduleGPipe
        self.schedule = kind(self.stages[0], self.microbatches, loss_fn=_loss_is_output, scale_grads=False)

    def set_loss(self, vocab_parallel: bool, kernels: str) -> None:
        for module in self.modules:
            module.vocab_parallel, module.kernels = vocab_parallel, kernels

    def loss_context(self) -> contextlib.AbstractContextManager:
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel() if self.modules[0].vocab_parallel else contextlib.nullcontext()

    def run(self, inputs: torch.Tensor, targets: torch.Tensor, loss_scale: float, train: bool) -> float:
        """Forward (and backward, when `train`) over the micro-batches of one batch; returns the sum of the
        micro-batch losses on the rank of the last stage, 0.0 elsewhere."""
        for module in self.modules:
            module.loss_scale = loss_scale
        losses: list[torch.Tensor] = []
        with self.loss_context():
            run = self.schedule.step if train else self.schedule.eval
            run(inputs, target=targets, losses=losses, return_outputs=False, targets=targets)
        if train and self.tied_group is not None:
            self._sum_tied_gradients()
        return float(torch.stack([loss.detach() for loss in losses]).sum()) if losses else 0.0

    def _sum_tied_gradients(self) -> None:
        """The embedding (first stage) and its copy as LM head (last stage): both get the summed gradient.
        Under TP the embedding's gradient can come back replicated: it is first laid out like the weight
        (a local slice, no communication), so both ranks' local pieces match."""
        weight = self.model.embed_tokens.weight
        grad = weight.grad
        if hasattr(grad, "placements") and grad.placements != weight.placements:
            grad = weight.grad = grad.redistribute(weight.device_mesh, weight.placements)
        dist.all_reduce(grad.to_local() if hasattr(grad, "to_local") else grad, group=self.tied_group)

    def norm_parameters(self) -> list[nn.Parameter]:
        """The parameters whose gradients count toward the global norm (the tied copy counts once)."""
        skip = self.model.embed_tokens.weight if self.holds_tied_copy else None
        return [p for p in self.model.parameters() if p is not skip]


def split_model(model: Transformer, config, pp_rank: int) -> Pipeline:
    """Prune `model` in place to pipeline rank `pp_rank`'s stages and wrap each stage in a StageModule."""
    pp, virtual = config.pp, config.pp_virtual_stages
    num_stages = pp * virtual
    counts = stage_layer_counts(model.config, num_stages, config.pp_stage_layers)
    starts = [sum(counts[:s]) for s in range(num_stages)]
    stage_indices = [pp_rank + k * pp for k in range(virtual)]  # looped: rank r runs r, r + pp, ...
    layers = {s: list(range(starts[s], starts[s] + counts[s])) for s in stage_indices}
    is_first, is_last = 0 in stage_indices, num_stages - 1 in stage_indices
    kept = [i for s in stage_indices for i in layers[s]]
    model.layers = StageLayers({str(i): model.layers[i] for i in kept})
    tied = model.lm_head is None
    if not is_first:
        model.embed_positions = model.embed_norm = None
        if not (is_last and tied):
            model.embed_tokens = None
    if not is_last:
        model.norm = model.lm_head = None
    modules = [StageModule(model, layers[s], s == 0, s == num_stages - 1) for s in stage_indices]
    return Pipeline(
        model=model,
        modules=modules,
        stage_indices=stage_indices,
        num_stages=num_stages,
        pp_rank=pp_rank,
        pp_size=pp,
        schedule_name=config.pp_schedule,
        microbatches=num_microbatches(config),
    )


def tied_embedding_groups(mesh, pp_rank: int) -> dist.ProcessGroup | None:
    """For each (dp, tp) coordinate, the group of its first and last pipeline ranks (which both hold the
    tied embedding); returns this rank's, or None for a middle rank. Every rank creates every group."""
    ranks = mesh.mesh.reshape(mesh.mesh.shape[0], -1)  # (pp, everything else)
    mine = None
    for column in range(ranks.shape[1]):
        pair = [int(ranks[0, column]), int(ranks[-1, column])]
        group = dist.new_group(pair)
        if dist.get_rank() in pair:
            mine = group
    return mine if pp_rank in (0, ranks.shape[0] - 1) else None
