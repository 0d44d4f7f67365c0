"""The engine's CPU thread count: the physical cores by default (one per core on SMT machines), the
--threads / num_threads value when given, OMP_NUM_THREADS respected."""

import torch

from kiln.engine import LLM
from kiln.engine.threads import apply_num_threads, physical_cores
from tests.hf_cases import build_hf_model

# Two packages of two cores with two hardware threads each: 8 CPUs, 4 physical cores.
CPUINFO = "\n\n".join(
    f"processor\t: {cpu}\nphysical id\t: {cpu // 4}\ncore id\t\t: {cpu % 2}\nsiblings\t: 4"
    for cpu in range(8)
)


def test_physical_cores_counts_package_and_core_pairs():
    assert physical_cores(CPUINFO, usable=set(range(8))) == 4
    assert physical_cores(CPUINFO, usable={0, 2}) == 1  # two hardware threads of one core
    assert physical_cores(CPUINFO, usable={0, 1, 4}) == 3
    assert physical_cores("processor\t: 0\n\nprocessor\t: 1", usable={0, 1}) == 2  # no topology: CPUs
    assert physical_cores("", usable={0, 1, 2}) == 3


def test_omp_num_threads_is_respected_and_an_explicit_count_wins(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert apply_num_threads(None) == 1 and torch.get_num_threads() == 1
        assert apply_num_threads(2) == 2 and torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert apply_num_threads(None) == physical_cores() == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_the_start_up_line_says_how_many_threads(tmp_path):
    build_hf_model("llama-gqa3-untied", tmp_path)
    before = torch.get_num_threads()
    try:
        llm = LLM(tmp_path, num_threads=1, verbose=False)
        assert "1 CPU threads" in llm.engine.startup_summary() and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
