"""`kiln bench kernels` refuses without a GPU (interpreted timings would say nothing about the kernels) and,
on one, times each kernel against its reference."""

import pytest
import torch
from typer.testing import CliRunner

from kiln.errors import KilnError


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda():
    from kiln.cli import app

    result = CliRunner().invoke(app, ["bench", "kernels", "--quick"])
    assert isinstance(result.exception, KilnError)
    assert "needs a CUDA GPU" in str(result.exception)


@pytest.mark.gpu
def test_quick_run_on_gpu(tmp_path):
    pytest.importorskip("triton")
    from kiln.bench.kernels import bench_kernels, format_rows

    result = bench_kernels(quick=True, only="norm")
    implementations = {(t.op, t.implementation) for t in result.timings}
    assert ("rms_norm forward", "triton") in implementations and (
        "layer_norm forward",
        "torch",
    ) in implementations
    assert all(t.ms > 0 and 0 < t.fraction_of_peak < 1.5 for t in result.timings)
    assert len(format_rows(result)) == len(result.timings)
