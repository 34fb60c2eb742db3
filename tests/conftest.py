import os

import pytest

# Two CPU cores in CI: keep each worker single-threaded so xdist workers don't oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the SDK-only tests run without torch
    torch = None


@pytest.fixture
def f64():
    """Run a test in float64 by default (accuracy tests must not drown in float32 noise)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
