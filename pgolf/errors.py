"""User-facing errors.

Anything the user can fix (a bad override, a missing dataset, a corrupt shard) raises
`PgolfError` with one line that names the value and the fix. `run.py` and the CLIs print
that line and exit non-zero; `assert` is kept for internal invariants only.
"""

# The challenge's cap on code + compressed model, in decimal bytes (here, torch-free, so that every
# module that checks it imports the one value).
SIZE_CAP_BYTES = 16_000_000


class PgolfError(ValueError):
    """An error caused by user input, reported as one line without a traceback."""
