"""Test-wide setup: Triton runs in its CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before Triton is imported, so it is set here, before any test
module imports the kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["auto", "reference"])
def backend(request):
    """Runs the test under ``use_backend("auto")`` (what users get) and ``use_backend("reference")``."""
    import adapterfast

    with adapterfast.use_backend(request.param):
        yield request.param
