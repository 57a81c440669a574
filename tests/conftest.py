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


# The files with the longest end-to-end runs, longest first (`--durations` on the merged tree,
# 2026-12-04). Under `-n 2 --dist loadfile` a worker takes whole files in collection order, so
# starting these first keeps one long file from running alone at the end (longest processing
# time first); the rest keep their order.
LONGEST_FIRST = ("test_sweep.py", "test_presets_frontier.py", "test_resume_families.py", "test_checkpoint.py",
                 "test_preemption.py", "test_train.py", "test_ranks_families.py", "test_training_records.py",
                 "test_submit_record.py", "test_presets_chain.py", "test_audit.py", "test_loaders.py",
                 "test_bad_input.py", "test_ttt_run.py", "test_model_paths.py", "test_search.py", "test_optuna.py")


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
