"""Session-wide fixtures: one small stdlib dataset (5 validation documents) shared by every
end-to-end test, built once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def fast_cache(tmp_path_factory) -> str:
    """The `data.cache_dir=...` override of the shared small dataset (use with runs.FAST)."""
    return f"data.cache_dir={tmp_path_factory.mktemp('cache') / 'stdlib_val5'}"
