"""The records' training-data loaders beside the baseline's sequential stream.

Each yields, per micro-step, this rank's int64 (x, y) of shape (local_tokens // seq_len, seq_len)
and has `state_dict()` / `load_state_dict()` so a checkpointed run continues with exactly the
batch it would have had. Choose one with `data.loader`:

- `sequential`: the baseline's stream (`DistributedTokenLoader`, pgolf.data.loader).
- `coprime` (2026-03-29 #1060, after PR #726): per shard a random phase and a random stride
  coprime to the shard's block count, so every seq_len block is visited once per cycle in a
  scrambled order; each global batch mixes `mix` shards (8 -> 32 over the first 1800 batches)
  drawn with probability ~ remaining_blocks^alpha (alpha 0.9 -> 0.5), sequence counts
  multinomial, buckets interleaved round-robin; global windows dealt to ranks [rank::world].
  RNG: PCG64 seeded with an FNV-1a-style hash of the shard paths as the record saw them
  (data/datasets/<dataset>/<file>), identical on every rank.
- `shuffled` (2026-04-05 #1394 `ShuffledSequenceLoader`): rank r owns files[r::world]; per
  shard a random phase and a permutation of its sequence starts; each sequence comes from a
  shard drawn with probability ~ its remaining sequences. RNG: PCG64(rank).
- `documents` (2026-04-10 #1530 `DocumentPackingLoader`): the contiguous stream, starting at
  each shard's first BOS and moving to the next shard when a global batch no longer fits, with
  the document boundaries of this rank's span in `last_cu_seqlens` (see `DocumentPackingLoader`).
"""

from __future__ import annotations

import glob
import math
from pathlib import Path

import numpy as np
import torch

from pgolf.data.loader import check_token_ids
from pgolf.data.shards import HEADER_BYTES, read_shard
from pgolf.errors import PgolfError

LOADERS = ("sequential", "coprime", "shuffled", "documents")


def _files(pattern: str) -> list[Path]:
    files = [Path(p) for p in sorted(glob.glob(pattern))]
    if not files:
        raise PgolfError(f"token shards {pattern}: no file matches; download shards with "
                         "`python -m pgolf.data download --variant sp1024 --train-shards 10` or use data=stdlib")
    return files


class _Shards:
    """Token counts (from the checked headers) and memory maps of a list of shards."""

    def __init__(self, files: list[Path], vocab_size: int | None = None):
        self.files, self.vocab_size = files, vocab_size
        self.num_tokens = np.array([self._count(f) for f in files], dtype=np.int64)
        self._maps: dict[int, np.memmap] = {}

    @staticmethod
    def _count(path: Path) -> int:
        header = np.fromfile(path, dtype="<i4", count=256)
        count = int(header[2]) if header.size == 256 else -1
        if header.size != 256 or path.stat().st_size != HEADER_BYTES + 2 * count:
            read_shard(path)  # raises the precise PgolfError
        return count

    def window(self, si: int, start: int, length: int) -> torch.Tensor:
        if si not in self._maps:
            self._maps[si] = np.memmap(self.files[si], mode="r", dtype="<u2", offset=HEADER_BYTES,
                                       shape=(int(self.num_tokens[si]),))
            if self.vocab_size is not None:  # once per shard, vectorised, when it is first read
                check_token_ids(torch.from_numpy(np.asarray(self._maps[si])), self.vocab_size, str(self.files[si]))
        return torch.from_numpy(np.array(self._maps[si][start:start + length], dtype=np.int64))


def _rng_state(rng: np.random.Generator) -> dict:
    s = rng.bit_generator.state  # 128-bit integers travel as strings (weights_only checkpoints)
    return {"state": str(s["state"]["state"]), "inc": str(s["state"]["inc"]), "has_uint32": s["has_uint32"],
            "uinteger": s["uinteger"]}


def _set_rng_state(rng: np.random.Generator, d: dict) -> None:
    rng.bit_generator.state = {"bit_generator": "PCG64", "state": {"state": int(d["state"]), "inc": int(d["inc"])},
                               "has_uint32": int(d["has_uint32"]), "uinteger": int(d["uinteger"])}


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)


def _batch(windows: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.stack(windows)  # (B, seq_len + 1)
    return _to_device(w[:, :-1].contiguous(), device), _to_device(w[:, 1:].contiguous(), device)


def _local_seqs(global_tokens: int, seq_len: int, world_size: int, grad_accum_steps: int) -> int:
    local = global_tokens // (world_size * grad_accum_steps)
    if local <= 0 or local % seq_len:
        raise PgolfError(f"train_batch_tokens={global_tokens} gives {local} tokens per rank per micro-step, not a "
                         f"positive multiple of seq_len={seq_len}; "
                         "use a multiple of world_size*grad_accum_steps*seq_len")
    return local // seq_len


class ShuffledSequenceLoader:
    """#1394: random-phase, permuted sequence starts per owned shard; shard ~ remaining sequences."""

    def __init__(self, pattern: str, *, rank: int, world_size: int, device: torch.device | str, seq_len: int,
                 vocab_size: int | None = None):
        files = _files(pattern)[rank::world_size]
        if not files:
            raise PgolfError(f"{pattern}: {len(_files(pattern))} shards for {world_size} ranks; the shuffled loader "
                             "gives each rank its own shards, so use at least one shard per rank")
        self.shards, self.seq_len, self.world_size = _Shards(files, vocab_size), seq_len, world_size
        self.device = torch.device(device)
        self.rng = np.random.Generator(np.random.PCG64(rank))
        self.starts: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(files)
        for si in range(len(files)):
            self._reset(si)

    def _reset(self, si: int) -> None:
        n = int(self.shards.num_tokens[si])
        max_phase = min(self.seq_len - 1, max(0, n - self.seq_len - 1))
        phase = int(self.rng.integers(max_phase + 1)) if max_phase > 0 else 0
        order = self.rng.permutation((n - 1 - phase) // self.seq_len)
        self.starts[si] = phase + order * self.seq_len  # popped from the end

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len != self.seq_len:
            raise PgolfError(f"shuffled loader built for seq_len={self.seq_len}, asked for {seq_len}")
        nseq = _local_seqs(global_tokens, seq_len, self.world_size, grad_accum_steps)
        remaining = np.array([len(s) for s in self.starts], dtype=np.float64)
        windows = []
        for _ in range(nseq):
            total = remaining.sum()
            if total <= 0:
                for si in range(len(self.starts)):
                    self._reset(si)
                remaining = np.array([len(s) for s in self.starts], dtype=np.float64)
                total = remaining.sum()
            si = int(self.rng.choice(len(self.starts), p=remaining / total))
            start, self.starts[si] = int(self.starts[si][-1]), self.starts[si][:-1]
            remaining[si] -= 1
            windows.append(self.shards.window(si, start, seq_len + 1))
        return _batch(windows, self.device)

    def state_dict(self) -> dict:
        return {"kind": "shuffled", "rng": _rng_state(self.rng),
                "starts": [torch.from_numpy(s.copy()) for s in self.starts]}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, "shuffled", lambda: len(state["starts"]), len(self.starts))
        _set_rng_state(self.rng, state["rng"])
        self.starts = [s.numpy().astype(np.int64) for s in state["starts"]]


class CoprimeStrideLoader:
    """#1060: coprime-stride block order per shard, mixed shards per global batch (see module docstring)."""

    RAMP_BATCHES = 1800

    def __init__(self, pattern: str, *, rank: int, world_size: int, device: torch.device | str, seq_len: int,
                 vocab_size: int | None = None):
        files = _files(pattern)
        self.rank, self.world_size, self.device, self.seq_len = rank, world_size, torch.device(device), seq_len
        self.shards = _Shards(files, vocab_size)
        seed = 0
        # FNV-1a-style hash of the paths the record sees when run from the challenge layout
        # (./data/datasets/<dataset>/<file>), so the stream equals the record's own run.
        for f in files:
            for b in f"data/datasets/{f.parent.name}/{f.name}".encode():
                seed = ((seed ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
        self.rng = np.random.Generator(np.random.PCG64(seed))
        n = len(files)
        self.phase, self.blocks, self.next = (np.zeros(n, dtype=np.int64) for _ in range(3))
        self.start, self.stride = np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64)
        self.ready = np.zeros(n, dtype=bool)
        self.batches = 0
        base = (self.shards.num_tokens - 1) // seq_len
        self.eligible = np.nonzero(base > 0)[0].astype(np.int64)
        self.base_blocks = base[self.eligible]

    def _coprime_stride(self, n: int) -> int:
        if n <= 1:
            return 1
        while True:
            s = int(self.rng.integers(1, n))
            if math.gcd(s, n) == 1:
                return s

    def _reset(self, si: int) -> None:
        n, L = int(self.shards.num_tokens[si]), self.seq_len
        max_phase = min(L - 1, max(0, n - L - 1))
        self.phase[si] = int(self.rng.integers(max_phase + 1)) if max_phase > 0 else 0
        bc = (n - 1 - int(self.phase[si])) // L
        self.blocks[si], self.next[si] = bc, 0
        self.start[si] = int(self.rng.integers(bc)) if bc > 1 else 0
        self.stride[si] = self._coprime_stride(bc)
        self.ready[si] = True

    def _take(self, si: int, count: int) -> list[tuple[int, int]]:
        out = []
        while count > 0:
            if not self.ready[si] or self.next[si] >= self.blocks[si]:
                self._reset(si)
            bc, ni = int(self.blocks[si]), int(self.next[si])
            take = min(count, bc - ni)
            phase, start, stride = int(self.phase[si]), int(self.start[si]), int(self.stride[si])
            out += [(si, phase + (start + (ni + j) * stride) % bc * self.seq_len) for j in range(take)]
            self.next[si] = ni + take
            count -= take
        return out

    def _global_windows(self, gns: int) -> list[tuple[int, int]]:
        ec = int(self.eligible.size)
        progress = min(self.batches / self.RAMP_BATCHES, 1.0)
        remaining = np.array([float(max(int(self.blocks[si]) - int(self.next[si]), 1)) if self.ready[si]
                              else float(self.base_blocks[i]) for i, si in enumerate(self.eligible.tolist())])
        weights = np.power(remaining, 0.90 - 0.40 * progress)
        ws = float(weights.sum())
        if not np.isfinite(ws) or ws <= 0.0:
            weights, ws = np.ones(ec), float(ec)
        probs = weights / ws
        low = min(max(8, self.world_size), ec, gns)
        high = min(max(32, self.world_size * 8), ec, gns)
        mix = max(1, min(int(round(low + progress * (high - low))), ec, gns))
        picked = self.rng.choice(ec, size=mix, replace=False, p=probs)
        shards, p = self.eligible[picked], probs[picked] / probs[picked].sum()
        counts = np.ones(mix, dtype=np.int64)
        if gns > mix:
            counts += self.rng.multinomial(gns - mix, p).astype(np.int64)
        perm = self.rng.permutation(mix)
        buckets = []
        for si, cnt in zip(shards[perm].tolist(), counts[perm].tolist()):
            b = self._take(int(si), int(cnt))
            if len(b) > 1:
                b = [b[int(k)] for k in self.rng.permutation(len(b)).tolist()]
            if b:
                buckets.append(b)
        windows, active = [], list(range(len(buckets)))
        while active:  # random round-robin over the buckets
            still = []
            for oi in self.rng.permutation(len(active)).tolist():
                bucket = buckets[active[oi]]
                windows.append(bucket.pop())
                if bucket:
                    still.append(active[oi])
            active = still
        return windows

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len != self.seq_len:
            raise PgolfError(f"coprime loader built for seq_len={self.seq_len}, asked for {seq_len}")
        nseq = _local_seqs(global_tokens, seq_len, self.world_size, grad_accum_steps)
        mine = self._global_windows(nseq * self.world_size)[self.rank::self.world_size]
        self.batches += 1
        return _batch([self.shards.window(si, pos, seq_len + 1) for si, pos in mine], self.device)

    def state_dict(self) -> dict:
        arrays = {k: torch.from_numpy(getattr(self, k).copy()) for k in ("phase", "blocks", "next", "start", "stride",
                                                                          "ready")}
        return {"kind": "coprime", "rng": _rng_state(self.rng), "batches": self.batches, **arrays}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, "coprime", lambda: len(state["phase"]), len(self.phase))
        _set_rng_state(self.rng, state["rng"])
        self.batches = int(state["batches"])
        for k in ("phase", "blocks", "next", "start", "stride", "ready"):
            setattr(self, k, state[k].numpy().copy())


class DocumentPackingLoader:
    """#1530: the contiguous stream with document boundaries.

    Per micro-step every rank takes its span of `local_tokens + 1` tokens from one shared
    cursor (rank r at cursor + r * span; the cursor then moves world * span); a shard is
    entered at its first BOS (`bos_id`, 1 in the records) and left when the next global span
    does not fit. x, y are that span viewed as (local_tokens // seq_len, seq_len), as the
    sequential loader's. Boundaries, for document-aware attention: `last_cu_seqlens` (int32,
    the flattened span's segment starts then its length, padded with the length to a multiple
    of 64, the records' FlashAttention varlen form; documents longer than seq_len are cut
    every seq_len tokens) and `last_max_seqlen`, the longest segment.
    """

    def __init__(self, pattern: str, *, rank: int, world_size: int, device: torch.device | str, seq_len: int,
                 bos_id: int = 1, cu_bucket_size: int = 64, vocab_size: int | None = None):
        self.files, self.vocab_size = _files(pattern), vocab_size
        self.rank, self.world_size, self.device, self.seq_len = rank, world_size, torch.device(device), seq_len
        self.bos_id, self.cu_bucket_size = bos_id, cu_bucket_size
        self.last_cu_seqlens: torch.Tensor | None = None
        self.last_max_seqlen = 0
        self._open(0)

    def _open(self, file_idx: int) -> None:
        self.file_idx, self.tokens = file_idx, read_shard(self.files[file_idx])
        if self.vocab_size is not None:
            check_token_ids(self.tokens, self.vocab_size, str(self.files[file_idx]))
        bos = (self.tokens == self.bos_id).nonzero(as_tuple=True)[0].to(torch.int64).numpy()
        self.bos = bos if bos.size else np.array([0], dtype=np.int64)
        self.cursor = int(self.bos[0])

    def cu_seqlens(self, local_start: int, total: int) -> tuple[torch.Tensor, int]:
        lo, hi = np.searchsorted(self.bos, local_start), np.searchsorted(self.bos, local_start + total)
        starts = (self.bos[lo:hi] - local_start).tolist()
        if not starts or starts[0] != 0:
            starts = [0] + starts
        segs = [s for a, b in zip(starts, starts[1:] + [total]) for s in range(a, b, self.seq_len)]
        bounds = segs + [total]
        cu = torch.full((-(-len(bounds) // self.cu_bucket_size) * self.cu_bucket_size,), total, dtype=torch.int32)
        cu[:len(bounds)] = torch.tensor(bounds, dtype=torch.int32)
        return cu, max(b - a for a, b in zip(bounds, bounds[1:]))

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        nseq = _local_seqs(global_tokens, seq_len, self.world_size, grad_accum_steps)
        span, self.seq_len = nseq * seq_len + 1, seq_len  # segments follow the call's length (#2014)
        tried = 0
        while self.cursor + span * self.world_size > self.tokens.numel():
            tried += 1
            if tried > len(self.files):
                raise PgolfError(f"no shard of {self.files[0].parent} holds a global batch of {span * self.world_size} "
                                 "tokens after its first BOS; use smaller train_batch_tokens or larger shards")
            self._open((self.file_idx + 1) % len(self.files))
        start = self.cursor + self.rank * span
        local = self.tokens[start:start + span].to(torch.int64)
        self.last_cu_seqlens, self.last_max_seqlen = self.cu_seqlens(start, span - 1)
        self.cursor += span * self.world_size
        local = _to_device(local, self.device)
        return local[:-1].view(-1, seq_len), local[1:].view(-1, seq_len)

    def state_dict(self) -> dict:
        return {"kind": "documents", "file_idx": self.file_idx, "cursor": self.cursor, "num_files": len(self.files)}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, "documents", lambda: int(state["num_files"]), len(self.files))
        self._open(int(state["file_idx"]))
        self.cursor = int(state["cursor"])


def _check_kind(state: dict, kind: str, saved_n, now_n: int) -> None:
    """The state must come from the same loader (checked first) over the same number of shards."""
    if state.get("kind", "sequential") != kind:
        raise PgolfError(f"loader state was saved by the {state.get('kind', 'sequential')} loader, this run uses "
                         f"data.loader={kind}; resume with the same loader")
    if saved_n() != now_n:
        raise PgolfError(f"loader state was saved with {saved_n()} shards but {now_n} match now; resume with the same "
                         "shard set")


def make_loader(kind: str, pattern: str, *, rank: int, world_size: int, device: torch.device | str, seq_len: int,
                bos_id: int = 1, vocab_size: int | None = None):
    """The `data.loader` option: one of LOADERS."""
    from pgolf.data.loader import DistributedTokenLoader

    if kind == "sequential":
        return DistributedTokenLoader(pattern, rank=rank, world_size=world_size, device=device, vocab_size=vocab_size)
    if kind == "documents":
        return DocumentPackingLoader(pattern, rank=rank, world_size=world_size, device=device, seq_len=seq_len,
                                     bos_id=bos_id, vocab_size=vocab_size)
    cls = {"coprime": CoprimeStrideLoader, "shuffled": ShuffledSequenceLoader}.get(kind)
    if cls is None:
        raise PgolfError(f"data.loader={kind!r} is unknown; use one of {', '.join(LOADERS)}")
    return cls(pattern, rank=rank, world_size=world_size, device=device, seq_len=seq_len, vocab_size=vocab_size)
