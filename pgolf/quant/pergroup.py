"""Per-group coding of a quantized object (2026-04-27 #1855, `COMPRESSOR=pergroup`; from #1586
via #1667/#1729).

Integer codes of the same role in every layer look alike, so they are coded together: each
int8 code matrix is put in the group of its role (its name without `blocks.<i>.`), layers in
index order. In the hot groups (#1855: the tied embedding, attention c_q, MLP fc) each matrix's
rows are first reordered greedily by L1 nearest neighbour, starting at row 0, the permutation
kept as uint16; every matrix is then transposed, so a stream runs down columns. Each group's
bytes go to a strong back end; everything else (scales, kept floats, LQER factors, the layout)
is torch.save'd and brotli'd at quality 11, window 24, and so are the permutations. The streams
are framed as the record's: "PGRP", a u32 count, u32 lengths, the streams; here the groups
come first, then the rest, then the permutations.

Back ends: `zpaq` (pip install zpaq: libzpaq method 5, one thread), `lrzip` (the record's
`lrzip -z -L 9`, run at nice 0; needs the lrzip binary to write and to read), `lzma` (preset 9 | extreme),
`brotli` (quality 11, window 24). The one used is named in the stored layout.
"""

from __future__ import annotations

import io
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from pgolf.errors import PgolfError
from pgolf.quant.codecs import PGRP_MAGIC

try:
    import brotli
except ImportError:
    brotli = None

# #1855's `_GROUP_ORDER` and `_SIMSORT_KEYS`. Other roles follow in name order when they hold at
# least PERGROUP_MIN_CODES codes (the records' float-passthrough threshold); smaller ones, like the
# attention-gate codes, stay with the rest, as in the record.
PERGROUP_ORDER = ("tok_emb.weight", "attn.c_k.weight", "attn.c_q.weight", "attn.c_v.weight", "attn.proj.weight",
               "mlp.fc.weight", "mlp.proj.weight")
PERGROUP_HOT = ("tok_emb.weight", "attn.c_q.weight", "mlp.fc.weight")
PERGROUP_BACKENDS = ("zpaq", "lrzip", "lzma", "brotli")
PERGROUP_MAX_SORT_ROWS = 65_535  # uint16 permutations
PERGROUP_MIN_CODES = 65_536
LRZIP_TIMEOUT_S = 900


def check_pergroup_backend(backend: str) -> None:
    """Raise PgolfError unless `backend` is known and usable here."""
    if backend not in PERGROUP_BACKENDS:
        raise PgolfError(f"pergroup backend {backend!r} is unknown; use one of {', '.join(PERGROUP_BACKENDS)}")
    if backend == "lrzip" and shutil.which("lrzip") is None:
        raise PgolfError("pergroup backend 'lrzip' needs the lrzip binary (apt-get install lrzip); or use 'zpaq'")
    if backend == "zpaq":
        try:
            import zpaq  # noqa: F401
        except ImportError:
            raise PgolfError("pergroup backend 'zpaq' needs the zpaq package; pip install zpaq") from None
    if brotli is None:
        raise PgolfError("compressor 'pergroup' needs the brotli package; pip install brotli")


# -----------------------------
# ROW ORDER
# -----------------------------


def similarity_order(m: np.ndarray) -> np.ndarray:
    """Greedy L1 nearest-neighbour row order from row 0, ties to the lowest row index: the
    permutation #1855's `_similarity_sort_l1` returns (uint16), without its per-step copy of
    the unused rows. m: (rows, cols) integers; returns (rows,) uint16."""
    n = m.shape[0]
    rows = torch.from_numpy(np.ascontiguousarray(m)).to(torch.int16)  # remaining rows, swap-removed
    index = torch.arange(n, dtype=torch.int64)  # their original indices
    order = np.empty(n, dtype=np.uint16)
    order[0], cur, live = 0, rows[0].clone(), n
    rows[0], index[0] = rows[n - 1].clone(), index[n - 1]
    live -= 1
    for k in range(1, n):
        d = (rows[:live] - cur).abs().sum(dim=1, dtype=torch.int64)  # exact L1 distances
        j = int(torch.argmin(d * n + index[:live]))  # smallest distance, then lowest original row
        order[k] = int(index[j])
        cur = rows[j].clone()
        live -= 1
        rows[j], index[j] = rows[live].clone(), index[live]
    return order


# -----------------------------
# BACK ENDS
# -----------------------------


def _lrzip(data: bytes, args: list[str]) -> bytes:
    with tempfile.TemporaryDirectory(prefix="pgolf_lrz_") as d:
        src, dst = os.path.join(d, "in"), os.path.join(d, "out")
        with open(src, "wb") as f:
            f.write(data)
        try:
            # -N 0: lrzip runs its work at nice 19 by default, which on a busy machine starves it (a 1 MB group
            # took 214 s of wall time for 2.7 CPU s on a loaded 2-core VM, 12 s with -N 0). Nice never changes the bytes.
            subprocess.run(["lrzip", "-q", "-N", "0", *args, "-o", dst, src], capture_output=True, check=True,
                           timeout=LRZIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise PgolfError(f"lrzip did not finish {len(data):,} bytes in {LRZIP_TIMEOUT_S} s; "
                             "use pergroup_backend=zpaq") from None
        except subprocess.CalledProcessError as e:
            raise PgolfError(f"lrzip failed ({e.stderr.decode(errors='replace').strip()[:200]}); "
                             "use pergroup_backend=zpaq") from None
        with open(dst, "rb") as f:
            return f.read()


def backend_compress(data: bytes, backend: str) -> bytes:
    """One group's bytes through a back end (see the module docstring for the settings)."""
    if not data:
        return b""
    if backend == "zpaq":
        import zpaq

        return zpaq.compress(data, level=5, threads=1)
    if backend == "lrzip":
        return _lrzip(data, ["-z", "-L", "9"])  # #1855's call: ZPAQ back end, level 9
    if backend == "lzma":
        return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
    return brotli.compress(data, quality=11, lgwin=24)


def backend_decompress(data: bytes, backend: str) -> bytes:
    if not data:
        return b""
    check_pergroup_backend(backend)
    if backend == "zpaq":
        import zpaq

        return zpaq.decompress(data)
    if backend == "lrzip":
        return _lrzip(data, ["-d", "-f"])
    if backend == "lzma":
        return lzma.decompress(data)
    return brotli.decompress(data)


# -----------------------------
# ENCODE / DECODE
# -----------------------------


def _pergroup_role(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[2:]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else name


def _pergroup_groups(codes: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    # {role: [names, layers in index order]} for every int8 code tensor, in PERGROUP_ORDER first.
    found: dict[str, list[tuple[int, str]]] = {}
    for name, t in codes.items():
        if t.dtype == torch.int8 and t.ndim == 2:
            layer = int(name.split(".")[1]) if _pergroup_role(name) != name else 0
            found.setdefault(_pergroup_role(name), []).append((layer, name))
    big = {r for r, entries in found.items() if sum(codes[n].numel() for _, n in entries) >= PERGROUP_MIN_CODES}
    roles = [r for r in PERGROUP_ORDER if r in found] + sorted(big - set(PERGROUP_ORDER))
    return {r: [n for _, n in sorted(found[r])] for r in roles}


def _pergroup_frame(streams: list[bytes]) -> bytes:
    return PGRP_MAGIC + struct.pack(f"<{1 + len(streams)}I", len(streams), *map(len, streams)) + b"".join(streams)


def pergroup_streams(blob: bytes) -> list[bytes]:
    (n,) = struct.unpack_from("<I", blob, 4)
    lengths = struct.unpack_from(f"<{n}I", blob, 8)
    off, out = 8 + 4 * n, []
    for length in lengths:
        out.append(blob[off:off + length])
        off += length
    if off != len(blob):
        raise PgolfError(f"per-group artifact has {len(blob) - off} bytes more or fewer than its frame says; re-export it")
    return out


def pergroup_encode(obj: Mapping[str, Any], *, backend: str = "zpaq", hot: tuple[str, ...] = PERGROUP_HOT,
           threads: int | None = None) -> bytes:
    """Quantized object -> per-group artifact bytes. Groups are sorted and coded on `threads`
    threads (default: one per CPU, at most one per group)."""
    check_pergroup_backend(backend)
    groups = _pergroup_groups(obj["quantized"])

    def payload(role: str) -> tuple[bytes, bytes, list]:
        data, perms, layout = [], [], []
        for name in groups[role]:
            arr = obj["quantized"][name].numpy()
            sort = role in hot and arr.shape[0] <= PERGROUP_MAX_SORT_ROWS
            if sort:
                order = similarity_order(arr)
                perms.append(order.tobytes())
                arr = arr[order]
            data.append(np.ascontiguousarray(arr.T).tobytes())
            layout.append([name, list(arr.shape), sort])
        return b"".join(data), b"".join(perms), layout

    def code(role: str) -> tuple[bytes, bytes, list]:
        data, perms, layout = payload(role)
        return backend_compress(data, backend), perms, layout

    workers = max(1, min(len(groups), threads or os.cpu_count() or 1))
    # Parallel over groups, one torch thread each: the sort's row ops are small, and intra-op
    # threads under contention made it 70x slower on a loaded 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            done = list(pool.map(code, groups))
    finally:
        torch.set_num_threads(before)
    grouped = {n for names in groups.values() for n in names}
    rest = {**obj, "quantized": {k: v for k, v in obj["quantized"].items() if k not in grouped}}
    layout = {"backend": backend, "groups": [[role, lay] for role, (_, _, lay) in zip(groups, done)],
              "order": list(obj["quantized"])}
    buf = io.BytesIO()
    torch.save({"obj": rest, "layout": layout}, buf)
    perms = b"".join(p for _, p, _ in done)
    return _pergroup_frame([c for c, _, _ in done] + [brotli.compress(buf.getvalue(), quality=11, lgwin=24),
                                            brotli.compress(perms, quality=11) if perms else b""])


def pergroup_decode(blob: bytes, *, source: str = "artifact") -> dict[str, Any]:
    """Per-group artifact bytes -> the quantized object `encode` was given."""
    if brotli is None:
        raise PgolfError(f"{source} is a per-group artifact; pip install brotli to read it")
    streams = pergroup_streams(blob)
    head = torch.load(io.BytesIO(brotli.decompress(streams[-2])), map_location="cpu", weights_only=True)
    obj, layout = head["obj"], head["layout"]
    perms = np.frombuffer(brotli.decompress(streams[-1]), dtype=np.uint16) if streams[-1] else np.empty(0, np.uint16)
    with ThreadPoolExecutor(max_workers=max(1, min(len(streams), os.cpu_count() or 1))) as pool:
        raw = list(pool.map(lambda s: backend_decompress(s, layout["backend"]), streams[:-2]))
    codes, p = {}, 0
    for (role, entries), data in zip(layout["groups"], raw):
        flat, off = np.frombuffer(data, dtype=np.int8), 0
        for name, (rows, cols), sorted_rows in entries:
            arr = flat[off:off + rows * cols].reshape(cols, rows).T
            off += rows * cols
            if sorted_rows:
                order = perms[p:p + rows]
                p += rows
                arr = arr[np.argsort(order, kind="stable")]  # row order[i] sits at i
            codes[name] = torch.from_numpy(np.ascontiguousarray(arr))
    codes.update(obj["quantized"])
    obj["quantized"] = {name: codes[name] for name in layout["order"]}
    return obj
