"""The one place that scores validation targets, and the record of what it did.

Legal test-time training (README FAQ since 2026-03-20; issue #1017's four conditions) needs
every prediction to be a full normalised distribution over the vocabulary from the artifact
and the tokens before it (C1, C2), every target's loss committed before any update whose batch
contained it (C3), and every target scored exactly once (C4). Records broke these by accident:
#1530's compile warm-up stepped on real validation tokens, 03-23's sliding TTT scored ~2k tail
targets twice. Here every TTT variant (and anything that trains on validation tokens) goes
through one `Scorer`, which enforces C3/C4 as it runs and keeps a ledger the tests and the
audit re-check.

Targets are named by their **position** j in the validation stream: target j is the token
`stream[j + 1]`, predicted from the prefix `stream[: j + 1]`; there are `stream.numel() - 1`.

API (h-tilt's n-gram tilt and audit build on this):

    scorer = Scorer(stream, luts, token_bytes=None, tilt=None, keep_ledger=True, keep_losses=False)
    nll = scorer.score(positions, logits)   # positions (N,) int64, logits (N, V) any float dtype
        commits, for each position, its loss in nats under the (tilted) full log-softmax and its
        byte count, then returns the *untilted* per-target NLL (N,) fp32, still attached to the
        autograd graph of `logits`, for the caller's training loss (the records train on the
        untilted loss: #2135's LoRA step). Raises ScoringError if a position was already scored
        (C4) or is out of range.
    scorer.update(positions)                 # before an optimizer step trained on these targets
        raises ScoringError unless every position has been committed (by this rank, or by any
        rank as of the last `sync()`); records the event.
    scorer.sync(lo=0, hi=None)               # all ranks: merge the committed sets of [lo, hi)
    scorer.totals()                          # (loss_sum nats, tokens, bytes) float64, this rank
    scorer.result()                          # all ranks: (val_loss, val_bpb); checks C4 globally
    scorer.ledger                            # [Event(kind "score"|"update", runs (k, 2) int64)]
    scorer.losses                            # with keep_losses: each target's committed nats (N,)
    scorer.save_ledger(path) / load_ledger(path) / check_ledger(events, num_targets)

`tilt(logp, context) -> logp'` gets the model's full log-softmax `logp` (N, V) fp32 (no grad)
and a `Context` (the positions and the stream; a tilt may read `stream[: j + 1]` for target j
and nothing after) and returns a log-distribution (N, V); the scorer checks that it sums to 1
within 1e-6 for every row (C2) and raises otherwise. Bytes follow pgolf.evaluate exactly: the
CaseOps sidecar entry `token_bytes[j + 1]` when given, else the tables on (stream[j], stream[j + 1]).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from pgolf.errors import PgolfError

NORMALISATION_TOL = 1e-6


def at_least_fp32(t: Tensor) -> Tensor:
    """`t` in float32, or float64 when it already is: the losses of a float64 model (the world-size
    tests' dtype, where summation order falls below 1e-9) are not rounded to float32."""
    return t if t.dtype == torch.float64 else t.float()


class ScoringError(PgolfError):
    """A score-first rule was about to be broken (double score, update before score, bad tilt)."""


@dataclass(frozen=True)
class Context:
    """What a tilt may read for targets `positions` (N,): `stream[: j + 1]` for target j."""
    positions: Tensor
    stream: Tensor


Tilt = Callable[[Tensor, Context], Tensor]


@dataclass(frozen=True)
class Event:
    """One scorer event: `kind` "score" or "update", over the targets in `runs` ((k, 2) [start, stop))."""
    kind: str
    runs: np.ndarray

    def positions(self) -> np.ndarray:
        return np.concatenate([np.arange(a, b) for a, b in self.runs]) if len(self.runs) else np.zeros(0, np.int64)


def to_runs(positions: Tensor) -> np.ndarray:
    """Compress positions (in their order) into maximal runs of consecutive ids, (k, 2) [start, stop)."""
    p = positions.detach().cpu().numpy().astype(np.int64).reshape(-1)
    if p.size == 0:
        return np.zeros((0, 2), np.int64)
    breaks = np.nonzero(np.diff(p) != 1)[0] + 1
    starts = np.concatenate(([0], breaks))
    stops = np.concatenate((breaks, [p.size]))
    return np.stack((p[starts], p[stops - 1] + 1), axis=1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class Scorer:
    """Commits each validation target's loss and bytes once, before any update that uses it.

    `stream` (N+1,) int token ids (the validation tokens, CPU or device); `luts` the byte tables
    (pgolf.evaluate.ByteLUTs) on the scoring device; `token_bytes` the CaseOps sidecar (N+1,) or
    None. Sums are float64 on the device of `luts`.
    """

    def __init__(self, stream: Tensor, luts, *, token_bytes: Tensor | None = None, tilt: Tilt | None = None,
                 keep_ledger: bool = True, keep_losses: bool = False):
        self.num_targets = stream.numel() - 1
        if self.num_targets < 1:
            raise PgolfError("validation split has no targets")
        self.luts, self.tilt, self.keep_ledger = luts, tilt, keep_ledger
        self.device = luts.base_bytes.device
        self.stream = stream.to(self.device)  # moved once: score() indexes it every call
        self.token_bytes = None if token_bytes is None else token_bytes.to(self.device, torch.float64)
        self.committed = torch.zeros(self.num_targets, dtype=torch.bool)  # CPU: by this rank
        self.known = self.committed  # by any rank as of the last sync() (the same tensor until then)
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss nats, tokens, bytes
        self.ledger: list[Event] = []
        self.num_updates = 0
        # Each target's committed loss (nats, float64, NaN until scored), for causality checks.
        self.losses = torch.full((self.num_targets,), float("nan"), dtype=torch.float64) if keep_losses else None

    # ---------------------------------------------------------------- scoring
    def score(self, positions: Tensor, logits: Tensor) -> Tensor:
        """Commit targets `positions` (N,) under `logits` (N, V); return the untilted NLL (N,) fp32
        (with grad when `logits` has it)."""
        pos_cpu = positions.detach().to("cpu", torch.int64).reshape(-1)
        if pos_cpu.numel() != logits.size(0):
            raise ScoringError(f"{pos_cpu.numel()} positions for {logits.size(0)} rows of logits")
        if pos_cpu.numel() == 0:
            return logits.new_zeros(0, dtype=torch.float32)
        if int(pos_cpu.min()) < 0 or int(pos_cpu.max()) >= self.num_targets:
            raise ScoringError(f"target position out of range 0..{self.num_targets - 1}")
        if bool(self.committed[pos_cpu].any()) or torch.unique(pos_cpu).numel() != pos_cpu.numel():
            first = int(pos_cpu[self.committed[pos_cpu]][0]) if bool(self.committed[pos_cpu].any()) else -1
            raise ScoringError(f"target {first} scored twice (C4: each target is scored exactly once)")
        pos = pos_cpu.to(self.device)
        stream = self.stream
        target = stream[pos + 1].long()
        logp = torch.log_softmax(at_least_fp32(logits), dim=-1)  # C2: the model's full distribution
        nll = -logp.gather(1, target[:, None]).squeeze(1)
        committed = nll.detach()
        if self.tilt is not None:
            tilted = self.tilt(logp.detach(), Context(pos, stream))
            mass = torch.logsumexp(tilted.double(), dim=-1).exp()
            worst = float((mass - 1).abs().max())
            if not math.isfinite(worst) or worst > NORMALISATION_TOL:
                raise ScoringError(f"the tilt's distribution sums to {1 + worst:.9f}, not 1 within "
                                   f"{NORMALISATION_TOL} (C2); renormalise it over the vocabulary")
            committed = at_least_fp32(-tilted.gather(1, target[:, None]).squeeze(1))
        if self.token_bytes is not None:
            nbytes = self.token_bytes[pos + 1]
        else:
            nbytes = self.luts.count(stream[pos].long(), target).to(torch.float64)
        self.sums[0] += committed.to(torch.float64).sum()
        self.sums[1] += pos.numel()
        self.sums[2] += nbytes.sum()
        self.committed[pos_cpu] = True
        if self.losses is not None:
            self.losses[pos_cpu] = committed.detach().double().cpu()
        if self.known is not self.committed:
            self.known[pos_cpu] = True
        if self.keep_ledger:
            self.ledger.append(Event("score", to_runs(pos_cpu)))
        return nll

    def update(self, positions: Tensor) -> None:
        """Declare that the next optimizer step trains on targets `positions`; they must be committed."""
        pos = positions.detach().to("cpu", torch.int64).reshape(-1)
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= self.num_targets):
            raise ScoringError(f"update on target position out of range 0..{self.num_targets - 1}")
        missing = ~self.known[pos]
        if bool(missing.any()):
            raise ScoringError(f"update on target {int(pos[missing][0])} before it was scored (C3: score first, "
                               "then train); a TTT variant must score a chunk before stepping on it")
        self.num_updates += 1
        if self.keep_ledger:
            self.ledger.append(Event("update", to_runs(pos)))

    def sync(self, lo: int = 0, hi: int | None = None) -> None:
        """Merge every rank's committed targets in [lo, hi) into `known` (call on all ranks, before
        training on targets another rank may have scored; a range keeps the all-reduce small)."""
        if not _distributed():
            return
        hi = self.num_targets if hi is None else hi
        merged = self.committed[lo:hi].to(torch.uint8)
        if dist.get_backend() == "nccl":
            merged = merged.cuda()
        dist.all_reduce(merged, op=dist.ReduceOp.MAX)
        if self.known is self.committed:
            self.known = self.committed.clone()
        self.known[lo:hi] |= merged.cpu().bool()

    # ---------------------------------------------------------------- results
    def totals(self) -> tuple[float, float, float]:
        return tuple(self.sums.tolist())

    def result(self, *, expect_all: bool = True) -> tuple[float, float]:
        """(val_loss nats/token, val_bpb) over all ranks. With `expect_all`, every target must have been
        scored exactly once across ranks (C4)."""
        sums = self.sums.clone()
        counts = self.committed.to(torch.uint8)
        if _distributed():
            if dist.get_backend() == "nccl":
                sums, counts = sums.cuda(), counts.cuda()
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        counts = counts.cpu()
        if bool((counts > 1).any()):
            raise ScoringError(f"target {int(torch.nonzero(counts > 1)[0])} scored on more than one rank (C4)")
        if expect_all and bool((counts == 0).any()):
            raise ScoringError(f"{int((counts == 0).sum())} of {self.num_targets} targets never scored "
                               f"(first: {int(torch.nonzero(counts == 0)[0])})")
        loss_sum, tokens, nbytes = sums.tolist()
        loss = loss_sum / tokens
        return loss, loss / math.log(2.0) * tokens / nbytes

    # ---------------------------------------------------------------- ledger
    def save_ledger(self, path: str | Path) -> None:
        """One JSON line per event: {"kind": ..., "runs": [[start, stop], ...]}."""
        with open(path, "w") as f:
            for e in self.ledger:
                f.write(json.dumps({"kind": e.kind, "runs": e.runs.tolist()}) + "\n")


def load_ledger(path: str | Path) -> list[Event]:
    events = []
    for line in Path(path).read_text().splitlines():
        d = json.loads(line)
        events.append(Event(d["kind"], np.asarray(d["runs"], dtype=np.int64).reshape(-1, 2)))
    return events


def check_ledger(events: list[Event], num_targets: int, *, expect_all: bool = True) -> str | None:
    """Re-check one rank's (or a merged, ordered) ledger: every update's targets scored by an
    earlier event, no target scored twice, and (with `expect_all`) every target scored. Returns
    None when legal, else one line saying what broke."""
    scored = np.zeros(num_targets, dtype=bool)
    for i, e in enumerate(events):
        p = e.positions()
        if e.kind == "score":
            if scored[p].any():
                return f"event {i}: target {int(p[scored[p]][0])} scored twice (C4)"
            scored[p] = True
        elif e.kind == "update":
            if not scored[p].all():
                return f"event {i}: update on target {int(p[~scored[p]][0])} before it was scored (C3)"
        else:
            return f"event {i}: unknown kind {e.kind!r}"
    if expect_all and not scored.all():
        return f"{int((~scored).sum())} of {num_targets} targets never scored (first: {int(np.nonzero(~scored)[0][0])})"
    return None
