import os

import pytest
import torch

# Without a GPU, kiln's Triton kernels are tested in Triton's CPU interpreter. Triton reads this when a
# kernel is defined, i.e. when a kiln.kernels module is first imported (by any test module), so it is set
# here, before collection.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
