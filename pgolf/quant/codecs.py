"""Byte compressors for the artifact, told apart on load by their own magic.

The challenge counts every byte, so an artifact is the bare compressor output with no header
of ours. On load: a zstd frame starts 28 B5 2F FD, an xz stream (lzma) FD 37 7A 58 5A 00, a
per-group artifact "PGRP" (pgolf.quant.pergroup), a zlib stream a CMF/FLG pair whose 16-bit
value is a multiple of 31; brotli has no magic and is what is left (a stream that looks like
zlib but does not inflate is tried as brotli too).

The records' codecs: zlib-9 (baseline), zstd-22 (03-19 .. 03-22), lzma preset 9 (03-25
#1019), byte shuffle (stride 2) then brotli quality 11 (#1089 via 04-05 #1394 .. #1851), and
per-group coding (#1855). `byte_shuffle` writes the records' "BSHF" + stride header and then
every stride-th byte from each offset, inside the compressed stream, so it is undone whenever
a decompressed payload starts with "BSHF" (a torch.save archive starts "PK").
"""

from __future__ import annotations

import lzma
import zlib

import numpy as np

from pgolf.errors import PgolfError

try:
    import zstandard
except ImportError:  # zlib artifacts still work without it
    zstandard = None
try:
    import brotli
except ImportError:
    brotli = None

COMPRESSORS = ("zlib", "zstd", "lzma", "brotli", "pergroup")
DEFAULT_LEVELS = {"zlib": 9, "zstd": 22, "lzma": 9, "brotli": 11, "pergroup": 0}  # the records' levels
LEVEL_RANGES = {"zlib": (0, 9), "zstd": (1, 22), "lzma": (0, 9), "brotli": (0, 11), "pergroup": (0, 0)}
PACKAGES = {"zstd": ("zstandard", lambda: zstandard), "brotli": ("brotli", lambda: brotli)}
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"
PGRP_MAGIC = b"PGRP"
BSHF_MAGIC = b"BSHF"
# zstd with one worker thread: its multithreaded framing, whose output is the same for any worker
# count >= 1. Below a few MB it equals the records' single-threaded `ZstdCompressor(level).compress`
# byte for byte (checked at 32 KB, 1 MB, 4 MB); on PR #192's 27,236,759-byte int6 state dict it is
# 1,031 B smaller (6,578,535 vs 6,579,566) for the same CPU seconds (docs/compression.md, export speed).
ZSTD_WORKERS = 1


def check_codec(compressor: str, level: int | None) -> int:
    """Validate a compressor and level; return the level with its default filled in."""
    if compressor not in COMPRESSORS:
        raise PgolfError(f"compressor {compressor!r} is unknown; use one of {', '.join(COMPRESSORS)}")
    level = DEFAULT_LEVELS[compressor] if level is None else level
    lo, hi = LEVEL_RANGES[compressor]
    if not lo <= level <= hi:
        raise PgolfError(f"{compressor} level {level} is out of range; use {lo}..{hi}")
    package, module = PACKAGES.get(compressor, (None, lambda: True))
    if module() is None:
        raise PgolfError(f"compressor {compressor!r} needs the {package} package; pip install {package} or use 'zlib'")
    return level


def byte_shuffle(data: bytes, stride: int) -> bytes:
    """The records' `_byte_shuffle`: "BSHF" + stride byte, then bytes 0, s, 2s, ..., then 1, 1+s, ...
    (the high bytes of fp16 scales end up together). stride < 2 or short data: unchanged."""
    if stride < 2 or len(data) < stride:
        return data
    src = np.frombuffer(data, dtype=np.uint8)
    return BSHF_MAGIC + bytes([stride]) + b"".join(src[pos::stride].tobytes() for pos in range(stride))


def byte_unshuffle(data: bytes) -> bytes:
    """Inverse of `byte_shuffle`; data without the header is returned as it is."""
    if len(data) < 5 or data[:4] != BSHF_MAGIC:
        return data
    stride, payload = data[4], np.frombuffer(data, dtype=np.uint8, offset=5)
    if stride < 2:
        return payload.tobytes()
    out, off = np.empty(len(payload), dtype=np.uint8), 0
    for pos in range(stride):
        view = out[pos::stride]
        view[:] = payload[off:off + len(view)]
        off += len(view)
    return out.tobytes()


def compress(raw: bytes, *, compressor: str = "zlib", level: int | None = None, byte_shuffle_stride: int = 0) -> bytes:
    """Compress bytes (default levels: zlib 9, zstd 22, lzma 9, brotli 11), no header of ours.

    The calls are the records' own (ZstdCompressor(level).compress, lzma.compress(preset=),
    brotli.compress(quality=)), so for the same bytes the output is theirs, byte for byte; zstd
    runs in its multithreaded framing (ZSTD_WORKERS), equal to theirs or smaller on big inputs."""
    level = check_codec(compressor, level)
    if compressor == "pergroup":
        raise PgolfError("compressor 'pergroup' codes a quantized object, not bytes; use pgolf.quant.pergroup.pergroup_encode")
    raw = byte_shuffle(raw, byte_shuffle_stride)
    if compressor == "zlib":
        return zlib.compress(raw, level=level)
    if compressor == "zstd":  # the records' call, in zstd's multithreaded framing (ZSTD_WORKERS)
        return zstandard.ZstdCompressor(level=level, threads=ZSTD_WORKERS).compress(raw)
    if compressor == "lzma":
        return lzma.compress(raw, preset=level)
    return brotli.compress(raw, quality=level)


def detect_compressor(blob: bytes) -> str | None:
    """'zstd', 'lzma', 'pergroup' or 'zlib' from the stream's magic; None otherwise (brotli or junk)."""
    if blob[:4] == ZSTD_MAGIC:
        return "zstd"
    if blob[:6] == XZ_MAGIC:
        return "lzma"
    if blob[:4] == PGRP_MAGIC:
        return "pergroup"
    # RFC 1950: CM=8 (deflate), window <= 32 KiB, FCHECK makes CMF*256+FLG divisible by 31.
    if len(blob) >= 2 and blob[0] & 0x0F == 8 and blob[0] >> 4 <= 7 and (blob[0] << 8 | blob[1]) % 31 == 0:
        return "zlib"
    return None


def decompress(blob: bytes, *, source: str = "artifact") -> bytes:
    """Inverse of `compress` (byte shuffle undone); the compressor is detected. `source` names
    the input in errors."""
    kind = detect_compressor(blob)
    if kind == "pergroup":
        raise PgolfError(f"{source} is a per-group artifact; read it with pgolf.quant.load_quantized")
    if kind == "zstd" and zstandard is None:
        raise PgolfError(f"{source} is zstd-compressed; pip install zstandard to read it")
    inflate = {"zlib": zlib.decompress, "lzma": lzma.decompress,
               "zstd": lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b)}
    errors = (zlib.error, lzma.LZMAError, getattr(zstandard, "ZstdError", zlib.error))
    if kind is not None:
        try:
            return byte_unshuffle(inflate[kind](blob))
        except errors as e:
            if kind != "zlib" or brotli is None:  # a brotli stream may start like zlib by chance
                raise PgolfError(f"{source} is a corrupt {kind} stream ({e}); re-export it") from None
            zlib_error = e
    if brotli is not None:
        try:
            return byte_unshuffle(brotli.decompress(blob))
        except brotli.error:
            if kind == "zlib":
                raise PgolfError(f"{source} is a corrupt zlib stream ({zlib_error}); re-export it") from None
    raise PgolfError(f"{source} is not a zstd, lzma, zlib or brotli stream (starts {blob[:4].hex()}); "
                     "pass an artifact written by pgolf.quant.export" + ("" if brotli else " (or pip install brotli)"))
