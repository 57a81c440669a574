"""Token shards in the challenge's on-disk format.

A shard is a 256-int32 little-endian header (magic 20240520, version 1, token count, rest
zero) followed by that many little-endian uint16 tokens. Keeping the exact format means
shards downloaded from the challenge, shards we build ourselves and the challenge's own
`train_gpt.py` are interchangeable.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pgolf.errors import PgolfError

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
_FIX = "re-create it with `python -m pgolf.data prepare ...` or re-download it"


def write_shard(path: str | os.PathLike, tokens: torch.Tensor | np.ndarray | Sequence[int]) -> None:
    """Write `tokens` (1-D, every id in [0, 65535]) as a shard at `path`. The bytes go to a
    temporary file in the same directory that is renamed over `path` only when complete, so a
    crash never leaves a truncated shard that a later run would trust."""
    path = Path(path)
    arr = tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if arr.ndim != 1:
        raise PgolfError(f"{path}: shard tokens must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 0xFFFF):
        raise PgolfError(
            f"{path}: token ids span [{int(arr.min())}, {int(arr.max())}], outside uint16 [0, 65535]; "
            "use a vocabulary of at most 65536 tokens"
        )
    if arr.size >= 2**31:
        raise PgolfError(f"{path}: {arr.size} tokens do not fit the int32 header count; write smaller shards")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, arr.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header.tobytes())
            f.write(arr.astype("<u2", copy=False).tobytes())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; shards are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_shard(path: str | os.PathLike) -> torch.Tensor:
    """Read a shard into a 1-D uint16 tensor, checking magic, version and that the file size
    is exactly header + 2 bytes per token; any mismatch raises `PgolfError` naming the file."""
    path = Path(path)
    count = shard_token_count(path)
    tokens = np.fromfile(path, dtype="<u2", count=count, offset=HEADER_BYTES)
    return torch.from_numpy(tokens.astype(np.uint16, copy=False))


def shard_token_count(path: str | os.PathLike) -> int:
    """The token count of a shard from its 1 KB header, after the checks of `read_shard`
    (magic, version, file size); cheap enough to run on every shard before a run starts."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise PgolfError(f"{path}: shard not found; {_FIX}") from None
    if size < HEADER_BYTES:
        raise PgolfError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header; {_FIX}")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, count = (int(v) for v in header[:3])
    if magic != SHARD_MAGIC:
        raise PgolfError(f"{path}: bad shard magic {magic} (expected {SHARD_MAGIC}); {_FIX}")
    if version != SHARD_VERSION:
        raise PgolfError(f"{path}: unsupported shard version {version} (expected {SHARD_VERSION}); {_FIX}")
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise PgolfError(
            f"{path}: file is {size} bytes but its header says {count} tokens ({expected} bytes); {_FIX}"
        )
    return count
