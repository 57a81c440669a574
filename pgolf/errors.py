"""User-facing errors.

Anything the user can fix (a bad override, a missing dataset, a corrupt shard) raises
`PgolfError` with one line that names the value and the fix. `run.py` and the CLIs print
that line and exit non-zero; `assert` is kept for internal invariants only.
"""


class PgolfError(ValueError):
    """An error caused by user input, reported as one line without a traceback."""
