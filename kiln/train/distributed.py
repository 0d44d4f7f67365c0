"""The process group a run belongs to: one process (nothing initialised), or a torchrun job whose
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) names its place.

Collectives carry an explicit timeout, so a rank that hangs fails the job with a message after
`collective_timeout_s` instead of blocking the others forever; torchrun's --max-restarts then restarts
the job, which resumes from the last complete checkpoint.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from kiln.errors import KilnError
from kiln.train.layout import ParallelLayout

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


def launched_world_size() -> int:
    """How many processes torchrun (or any env:// launcher) started; 1 outside one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def restart_count() -> int:
    """How often torchrun has restarted this job after a failure (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


@dataclass
class Distributed:
    """This process's place in the job. `rank`/`world_size` count processes; `dp_rank`/`dp_size` count
    data-parallel ranks (the tensor-parallel ranks of one group, and the pipeline stages of one
    pipeline, see the same data); `pp_rank` is the pipeline stage (group) this process runs."""

    layout: ParallelLayout
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: DeviceMesh | None = None
    timeout_s: float = 600.0

    @classmethod
    def single(cls, device: torch.device | None = None) -> Distributed:
        """One process, no process group."""
        return cls(layout=ParallelLayout(), device=device or torch.device("cpu"))

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        return self.layout.dp_size

    @property
    def dp_rank(self) -> int:
        # tp is the mesh's innermost dimension, pp its outermost
        return (self.rank // self.layout.tp) % self.layout.dp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.layout.dp_size * self.layout.tp)

    @property
    def data_copies(self) -> int:
        """How many processes hold each data-parallel rank's batch (its tp ranks x pp stages)."""
        return self.layout.tp * self.layout.pp

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) a tensor over every process; returns it unchanged in one process."""
        if self.enabled:
            value = value.to(self.device)
            dist.all_reduce(value)
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank."""
        return bool(self.sum(torch.tensor(int(flag))).item()) if self.enabled else flag

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        if not self.enabled:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        found: list[Any] = [None] * self.world_size
        dist.all_gather_object(found, value)
        return found

    def close(self) -> None:
        """Leave the process group once every rank is done with its collectives."""
        if self.enabled and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def exit_worker(self) -> None:
        """End a torchrun worker whose run is finished and written (call `close` first) without the
        interpreter's teardown. destroy_process_group does not free the gloo process groups the model's
        FSDP/TP state still holds; they, and their worker threads, are torn down while Python finalizes,
        where a worker that drops a tensor takes the GIL and the process aborts ("terminate called
        without an active exception", exit -6: pytorch/pytorch#190489, seen once in CI after a restarted
        run), and torchrun then fails the finished job. One process (no torchrun) returns normally."""
        if not self.enabled:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def setup(layout_args: dict[str, int], device: torch.device, timeout_s: float) -> Distributed:
    """Join the torchrun job (if any) and build its device mesh. `layout_args` are pp, dp_replicate,
    dp_shard, tp and ep as configured (dp_shard may be -1: the rest of the world)."""
    world_size = launched_world_size()
    layout = ParallelLayout.resolve(world_size, **layout_args)
    if world_size == 1:
        return Distributed(layout=layout, device=device, timeout_s=timeout_s)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            store=_restart_safe_store(world_size, timeout_s),
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if backend == "nccl" else None,
        )
    if dist.get_world_size() != world_size:
        raise KilnError(f"WORLD_SIZE={world_size} but the process group has {dist.get_world_size()} ranks")
    mesh = _device_mesh(layout, device)
    return Distributed(
        layout=layout, rank=rank, local_rank=local_rank, device=device, mesh=mesh, timeout_s=timeout_s
    )


def _device_mesh(layout: ParallelLayout, device: torch.device) -> DeviceMesh:
    """(pp, dp_replicate, dp_shard, tp); with expert parallelism dp_shard is (dp_shard_mod_ep, ep)
    flattened, so experts shard over "ep" and replicate over "dp_shard_mod_ep" while the rest shards over
    "dp_shard"."""
    if layout.ep == 1:
        shape = (layout.pp, layout.dp_replicate, layout.dp_shard, layout.tp)
        return init_device_mesh(device.type, shape, mesh_dim_names=MESH_DIMS)
    shape = (layout.pp, layout.dp_replicate, layout.dp_shard // layout.ep, layout.ep, layout.tp)
    names = ("pp", "dp_replicate", "dp_shard_mod_ep", "ep", "tp")
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    mesh["dp_shard_mod_ep", "ep"]._flatten("dp_shard")
    return mesh


def _restart_safe_store(world_size: int, timeout_s: float) -> dist.Store | None:
    """The store to bootstrap the process group from, or None for torch's default (env://).

    torchrun's c10d rendezvous hands its workers a TCP store that outlives restarts, so keys an earlier
    attempt left there (rank 0's old gloo/NCCL address) are read as current and the restarted job fails
    to connect (pytorch/pytorch#135712). On one node every worker shares one restart count, which then
    namespaces the store. Across nodes the counts can differ, so torchrun must make a fresh store per
    attempt instead (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1).
    """
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if not shared or int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) == 0:
        return None
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:
        raise KilnError(
            "restarts (--max-restarts) across several nodes need a fresh rendezvous store per attempt: "
            "set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment on every node"
        )
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
    )
    return dist.PrefixStore(f"kiln/attempt_{restart_count()}", store)


def is_collective_failure(error: BaseException) -> bool:
    """A collective that timed out or lost a peer (gloo raises these as RuntimeError)."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("Timed out", "Connection closed by peer", "Connection reset", "gloo")
    )
