"""How many intra-op threads the engine runs on CPU: the physical cores it may use, unless told otherwise.

On CPUs with SMT (two hardware threads per core) a second thread per core shares the core's vector units
and caches, and decode (weight streaming) and GEMMs gain nothing from it while OpenMP barriers wait for the
slowest thread; llama.cpp and vLLM's CPU backend also default to one thread per physical core.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def physical_cores(cpuinfo: str | None = None, usable: set[int] | None = None) -> int:
    """Distinct (package, core) pairs among the CPUs this process may run on (Linux /proc/cpuinfo);
    the count of usable CPUs where that can't be read."""
    usable = usable if usable is not None else set(os.sched_getaffinity(0))
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    cores: set[tuple[str, str]] = set()
    for entry in cpuinfo.strip().split("\n\n"):
        fields = dict(line.split(":", 1) for line in entry.splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        if "processor" not in fields or int(fields["processor"]) not in usable:
            continue
        if "core id" not in fields:
            return len(usable)  # no topology (some VMs, other architectures): one thread per CPU
        cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or len(usable)


def apply_num_threads(num_threads: int | None) -> int:
    """Set torch's intra-op threads: `num_threads` when given, else the physical cores unless
    OMP_NUM_THREADS says otherwise (then torch's own setting stays). Returns the count."""
    if num_threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        num_threads = physical_cores()
    if num_threads != torch.get_num_threads():
        torch.set_num_threads(num_threads)
    return num_threads
