"""Checkpoints: save a run mid-training and continue it bit-exactly.

None of the records' scripts can resume; a preempted 8-GPU job loses everything. A
checkpoint is a directory `checkpoint/` in the run dir: rank 0 writes the weights, SWA
sums and `meta.json` (step, train time, config); every rank writes its own optimizer state
(Muon's momentum lives on the rank that owns the matrix), data-loader position and RNG
states. All files go to `checkpoint.tmp/` first and the directory is swapped in only when
every rank is done, so a crash mid-save leaves the previous checkpoint intact.

Once the last step is done, a run writes `final_model.pt` and then `final_state.json` (the
config and the training figures): from there on a stopped run is resumed by exporting and
evaluating `final_model.pt` again, with no training. With a checkpoint at step boundaries
before that, a signal at any moment leaves a state that `resume=DIR` finishes.

Everything is loaded with `torch.load(weights_only=True)`: a checkpoint cannot run code.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pgolf.errors import PgolfError

CHECKPOINT_DIR = "checkpoint"
FINAL_STATE = "final_state.json"  # training is done: final_model.pt + these figures are all a resume needs
# Keys that may differ between the interrupted run and its continuation.
RESUME_FREE_KEYS = ("run_id", "resume", "logger", "checkpoint", "distributed")


@dataclass(frozen=True, kw_only=True)
class Checkpointing:
    """The `checkpoint` group. `every_seconds` counts train time (eval and saving excluded),
    `every_steps` optimizer steps; 0 turns either off. SIGTERM and SIGUSR1 (SLURM's
    preemption and time-limit warnings) always checkpoint at the next step boundary."""

    every_seconds: float = 0.0
    every_steps: int = 0

    def __post_init__(self):
        if self.every_seconds < 0 or self.every_steps < 0:
            raise PgolfError(f"checkpoint.every_seconds={self.every_seconds} and checkpoint.every_steps="
                             f"{self.every_steps} must be >= 0 (0 = off)")

    def due(self, step: int, train_ms: float, last_step: int, last_ms: float) -> bool:
        by_steps = self.every_steps > 0 and step - last_step >= self.every_steps
        by_time = self.every_seconds > 0 and train_ms - last_ms >= 1000.0 * self.every_seconds
        return by_steps or by_time


class Preemption:
    """Turns SIGTERM/SIGUSR1 into a flag the loop reads at a step boundary; `chain()` then
    hands the signal to whoever had it before (e.g. submitit's requeue handler)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}
        self.depth = 0  # re-entrant: the job holds it from setup to metrics.json, the loop again inside

    def __enter__(self) -> "Preemption":
        self.depth += 1
        if self.depth > 1:
            return self
        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no preemption support
                pass
        return self

    def __exit__(self, *exc) -> None:
        self.depth = max(self.depth - 1, 0)
        if self.depth == 0:
            self.uninstall()

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def chain(self) -> None:
        """Restore the previous handlers and deliver the signal to them (default: terminate)."""
        self.depth = 0
        sig, previous = self.signum, self.previous.get(self.signum)
        self.uninstall()
        if callable(previous):
            previous(sig, None)
        raise SystemExit(128 + int(sig))


def fault_point(phase: str) -> None:
    """Test hook: with PGOLF_FAULT_AT=<phase> this process sends itself SIGTERM (or the signal named by
    PGOLF_FAULT_SIGNAL, e.g. KILL) when the run reaches that phase, so tests stop a run at an exact
    moment: `warmup`, `step:N` (after step N), `val:N` (the eval at step N),
    `export`, `sliding` (the final sliding eval)."""
    if os.environ.get("PGOLF_FAULT_AT") == phase:
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("PGOLF_FAULT_SIGNAL", "TERM")))


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": list(random.getstate()[1]),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


def save_checkpoint(run_dir: Path, *, rank: int, world_size: int, barrier, write, step: int, train_ms: float, config: dict,
         model_state: dict | None, swa_state: dict | None, rank_state: dict, ema_state: dict | None = None) -> Path:
    """Write one checkpoint (every rank calls this; `barrier()` syncs ranks, `write(path, bytes)`
    is the atomic writer). Returns the checkpoint directory."""
    final, tmp, old = run_dir / CHECKPOINT_DIR, run_dir / f"{CHECKPOINT_DIR}.tmp", run_dir / f"{CHECKPOINT_DIR}.old"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    write(tmp / f"rank{rank}.pt", _to_bytes(rank_state))
    if rank == 0:
        write(tmp / "model.pt", _to_bytes({"model": model_state, "swa": swa_state, "ema": ema_state}))
        meta = {"step": step, "train_ms": train_ms, "world_size": world_size, "config": config}
        write(tmp / "meta.json", (json.dumps(meta, indent=1) + "\n").encode())
    barrier()
    if rank == 0:  # swap: the previous checkpoint survives until the new one is complete
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint in a run dir (`checkpoint.old` covers a crash mid-swap)."""
    for name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old"):
        if (run_dir / name / "meta.json").is_file():
            return run_dir / name
    return None


def resume_source(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint a run continues from: `resume=DIR`'s (which must exist), else its own dir's."""
    ckpt = find_checkpoint(Path(resume).resolve() if resume else run_dir)
    if resume and ckpt is None:
        _nothing_to_resume(resume)
    return ckpt


def _nothing_to_resume(resume: str) -> None:
    metrics = Path(resume) / "metrics.json"
    if metrics.is_file() and json.loads(metrics.read_text()).get("status") == "finished":
        raise PgolfError(f"resume={resume}: that run already finished (metrics.json); there is nothing to resume, "
                         "start a new run")
    raise PgolfError(f"resume={resume}: no checkpoint found there (checkpoint/meta.json, or {FINAL_STATE} once "
                     "training is done); a run saves one with checkpoint.every_seconds/every_steps or on SIGTERM/SIGUSR1")


def find_final_state(run_dir: Path) -> Path | None:
    """`final_state.json` when training finished there but export or evaluation did not."""
    path = run_dir / FINAL_STATE
    return path if path.is_file() and (run_dir / "final_model.pt").is_file() else None


def final_state(resume: str | None, run_dir: Path, config: dict) -> dict | None:
    """The training figures of a run that only needs exporting and evaluating again (same config), else None."""
    path = find_final_state(Path(resume).resolve() if resume else run_dir)
    if path is None:
        return None
    saved = json.loads(path.read_text())
    check_same_config(path, saved["config"], config)
    return saved["figures"]


def final_state_bytes(config: dict, figures: dict) -> bytes:
    return (json.dumps({"config": config, "figures": figures}, indent=1) + "\n").encode()


def can_resume(resume: str | None, run_dir: Path) -> bool:
    """Whether this run continues an earlier attempt (a checkpoint or finished training to pick up)."""
    where = Path(resume).resolve() if resume else run_dir
    return find_checkpoint(where) is not None or find_final_state(where) is not None


def resume_config(run_dir: Path) -> tuple[Path, dict]:
    """What `resume=DIR` continues from and the config it was made with (PgolfError if nothing)."""
    final = find_final_state(run_dir)
    if final is not None:
        return final, json.loads(final.read_text())["config"]
    ckpt = find_checkpoint(run_dir)
    if ckpt is None:
        _nothing_to_resume(str(run_dir))
    return ckpt, json.loads((ckpt / "meta.json").read_text())["config"]


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, ignoring the ones a continuation may change."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        if not prefix and key in RESUME_FREE_KEYS:
            continue
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, dotted + ".")
        elif a != b:
            diffs.append(f"{dotted}={a!r} (checkpoint) vs {b!r} (this run)")
    return diffs


def check_same_config(ckpt: Path, saved: dict, config: dict) -> None:
    diffs = config_differences(saved, config)
    if diffs:
        raise PgolfError(f"cannot resume from {ckpt}: its config differs: {'; '.join(diffs[:3])}"
                         f"{' ...' if len(diffs) > 3 else ''}; resume with the same config or start a new run")


def load_checkpoint(ckpt: Path, *, rank: int, world_size: int, config: dict) -> dict:
    """Read a checkpoint for this rank after checking it was made by the same config and world size."""
    meta = json.loads((ckpt / "meta.json").read_text())
    check_same_config(ckpt, meta["config"], config)
    if meta["world_size"] != world_size:
        raise PgolfError(f"cannot resume from {ckpt}: it was written by {meta['world_size']} processes, this run "
                         f"has {world_size}; resume with --nproc_per_node={meta['world_size']}")
    rank_file = ckpt / f"rank{rank}.pt"
    weights = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
    return {**meta, **weights, "rank_state": torch.load(rank_file, map_location="cpu", weights_only=True)}


def restore_checkpoint(ckpt: Path, *, rank: int, world_size: int, config: dict, model, optimizers, swa, loader,
                       ema=None, growth=None) -> tuple[int, float]:
    """Load a checkpoint into the run's objects (`growth`: the training length and its LR re-warm,
    pgolf.progressive.SeqGrowth); returns (step, train_ms) to continue from."""
    state = load_checkpoint(ckpt, rank=rank, world_size=world_size, config=config)
    model.load_state_dict(state["model"], strict=True)
    swa.load_state_dict(state["swa"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"], device=next(model.parameters()).device)
    optimizers.load_state_dict(state["rank_state"]["optimizer"])
    loader.load_state_dict(state["rank_state"]["loader"])
    set_rng_state(state["rank_state"]["rng"])
    if growth is not None and "growth" in state["rank_state"]:
        growth.load_state_dict(state["rank_state"]["growth"])
    return state["step"], state["train_ms"]
