"""Session-wide fixtures: one small stdlib dataset (5 validation documents) shared by every
end-to-end test, built once per session."""

from __future__ import annotations

import os

import pytest
import torch

# Under pytest-xdist (`-n 2`, the README's command) each worker and every process it starts
# uses one thread: two workers of two threads each on two cores ran the suite 60% slower
# than one serial process, two workers of one thread each 20% faster.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fast_cache(tmp_path_factory) -> str:
    """The `data.cache_dir=...` override of the shared small dataset (use with runs.FAST)."""
    return f"data.cache_dir={tmp_path_factory.mktemp('cache') / 'stdlib_val5'}"
