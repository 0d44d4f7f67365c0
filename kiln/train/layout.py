"""ParallelLayout: how a run's processes divide the work (pipeline stages, data-parallel replicas and
shards, tensor parallelism), resolved from the config's --pp/--dp-replicate/--dp-shard/--tp against the
world size."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.config import ModelConfig
from kiln.errors import KilnError


@dataclass(kw_only=True, slots=True, frozen=True)
class ParallelLayout:
    """pp x dp_replicate x dp_shard x tp processes, in that order on the device mesh (tp innermost, so a
    tensor-parallel group shares a node's fast links; pp outermost, since a pipeline sends only one
    activation per micro-batch between neighbouring stages and tolerates the slowest links).

    dp_shard > 1 shards parameters, gradients and optimizer state over that many data-parallel ranks
    (FSDP2, ZeRO-3-like); dp_replicate > 1 keeps full replicas (plain DDP when dp_shard == 1, HSDP when
    both are > 1); tp > 1 splits every matmul across that many ranks (tensor + sequence parallel).
    """

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    # Expert parallel degree: each MoE layer's experts are split over groups of ep data-parallel shard
    # ranks (EP borrows from dp_shard, as in torchtitan), tokens travel to them by all-to-all. Combines
    # with tp (each tp rank routes its sequence slice) and dp_replicate (experts replicate like the rest).
    ep: int = 1
    # Pipeline parallel degree: the model's layers split into pp consecutive stages (kiln.train.pipeline).
    pp: int = 1

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "dp_shard", "tp", "ep", "pp"):
            if getattr(self, name) < 1:
                raise KilnError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ep > 1 and self.dp_shard % self.ep:
            raise KilnError(
                f"ep={self.ep} must divide dp_shard={self.dp_shard}: expert-parallel ranks are data-parallel "
                "shard ranks; launch dp_shard (the processes dp_replicate and tp leave) as a multiple of ep"
            )
        if self.ep > 1 and self.pp > 1:
            raise KilnError("--ep does not combine with --pp yet; use --ep with --dp-shard (FSDP2)")

    @classmethod
    def resolve(
        cls,
        world_size: int,
        dp_replicate: int = 1,
        dp_shard: int = -1,
        tp: int = 1,
        ep: int = 1,
        pp: int = 1,
    ) -> ParallelLayout:
        """The layout for `world_size` processes; dp_shard=-1 takes whatever pp * dp_replicate * tp leaves."""
        if dp_replicate < 1 or tp < 1 or pp < 1 or (dp_shard < 1 and dp_shard != -1):
            raise KilnError(
                f"need pp >= 1, dp_replicate >= 1, tp >= 1 and dp_shard >= 1 (or -1 for the rest); got "
                f"pp={pp}, dp_replicate={dp_replicate}, dp_shard={dp_shard}, tp={tp}"
            )
        automatic = dp_shard == -1
        needed = pp * dp_replicate * tp * (1 if automatic else dp_shard)
        if automatic and world_size % needed == 0:
            dp_shard = world_size // needed
        if (automatic and dp_shard == -1) or pp * dp_replicate * dp_shard * tp != world_size:
            shard = "(the rest)" if automatic else str(dp_shard)
            count = f"a multiple of {needed}" if automatic else str(needed)
            raise KilnError(
                f"the layout pp={pp} x dp_replicate={dp_replicate} x dp_shard={shard} x tp={tp} needs "
                f"{count} "
                f"processes but {world_size} are running; launch with torchrun --nproc-per-node={needed} "
                f"(on one node), or choose degrees whose product is {world_size}"
            )
        return cls(dp_replicate=dp_replicate, dp_shard=dp_shard, tp=tp, ep=ep, pp=pp)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: each draws its own slice of the global batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def uses_fsdp(self) -> bool:
        # With tensor or pipeline parallelism, replicas are kept by HSDP (fully_shard on a 2-D mesh) rather
        # than DDP (whose autograd hooks the pipeline's per-stage backward bypasses).
        return self.dp_shard > 1 or (self.dp_replicate > 1 and (self.tp > 1 or self.pp > 1))

    @property
    def uses_ddp(self) -> bool:
        return self.dp_replicate > 1 and not self.uses_fsdp

    def describe(self) -> str:
        parts = []
        if self.dp_shard > 1 or (self.uses_fsdp and self.dp_replicate > 1):
            kind = "HSDP" if self.dp_replicate > 1 else "FSDP"
            parts.append(
                f"{kind} {self.dp_replicate}x{self.dp_shard}" if kind == "HSDP" else f"FSDP {self.dp_shard}"
            )
        elif self.uses_ddp:
            parts.append(f"DDP {self.dp_replicate}")
        if self.tp > 1:
            parts.append(f"TP {self.tp}")
        if self.pp > 1:
            parts.append(f"PP {self.pp}")
        if self.ep > 1:
            parts.append(f"EP {self.ep}")
        return " + ".join(parts) or "single process"

    def check_model(self, model: ModelConfig, seq_len: int) -> None:
        """Tensor parallelism splits heads, the MLP's inner width and the sequence evenly across ranks;
        expert parallelism splits the experts."""
        if self.ep > 1 and (model.num_experts == 0 or model.num_experts % self.ep):
            raise KilnError(
                f"ep={self.ep} must divide the model's num_experts ({model.num_experts}); a dense model "
                "has no experts to split"
            )
        if self.pp > 1 and model.num_experts:
            raise KilnError("pipeline parallelism does not support MoE models yet; use --dp-shard and --ep")
        if self.tp == 1:
            return
        if model.position == "alibi":
            raise KilnError(
                "tensor parallelism does not support ALiBi models; use --dp-shard instead of --tp"
            )
        sizes = {
            "num_heads": model.num_heads,
            "num_kv_heads": model.num_kv_heads,
            "intermediate_size": model.intermediate_size,
            "vocab_size": model.vocab_size,
            "seq_len": seq_len,
        }
        uneven = [f"{name}={value}" for name, value in sizes.items() if value % self.tp]
        if uneven:
            raise KilnError(
                f"tp={self.tp} must divide {', '.join(uneven)}; choose a tp that divides the head counts, "
                "intermediate_size, vocab_size and seq_len"
            )
