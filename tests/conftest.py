"""Shared test settings."""

import os

import pytest

# Tests must never touch a cluster a developer happens to run: every local Ray is its own.
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a loaded 2-core machine OpenMP spinning made them ~10x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def local_ray():
    """A local 2-CPU Ray for one test module (modules that need another shape define their own)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
