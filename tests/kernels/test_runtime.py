"""The `kernels` switch, and triton as an optional dependency: without it kiln imports, the torch paths
run, `auto` quietly means torch, and `triton` says how to install it."""

import subprocess
import sys

import pytest
import torch

from kiln.errors import KilnError
from kiln.kernels.runtime import check_kernels, use_triton


def test_choices():
    cpu = torch.zeros(1)
    assert use_triton("torch", cpu) is False
    assert use_triton("auto", cpu) is False  # auto is Triton on CUDA tensors only
    with pytest.raises(KilnError, match="kernels must be one of torch, triton, auto"):
        check_kernels("cuda")
    with pytest.raises(KilnError, match="kernels must be one of"):
        use_triton("fast", cpu)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton("triton", torch.zeros(1)) is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KilnError, match="TRITON_INTERPRET=1"):
        use_triton("triton", torch.zeros(1))


_WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # any `import triton` now raises ImportError
import torch, kiln
from kiln.errors import KilnError
from kiln.kernels import flash_attention, linear_cross_entropy, norms, paged_attention, rope, swiglu
from kiln.models.transformer import Transformer

config = kiln.preset("tiny", vocab_size=64)
ids = torch.randint(0, 64, (1, 5))
for kernels in ("torch", "auto"):
    Transformer(config, kernels=kernels)(ids)
hidden, weight, targets = torch.randn(6, 8), torch.randn(11, 8), torch.randint(0, 11, (6,))
linear_cross_entropy.linear_cross_entropy(hidden, weight, targets, kernels="auto")
try:
    Transformer(config, kernels="triton")(ids)
except KilnError as error:
    assert "pip install 'kiln[gpu]'" in str(error), error
    print("ok")
"""


def test_kiln_works_without_triton():
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TRITON], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
