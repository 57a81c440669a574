"""The run log (stdout + train.log, rank 0 only) and the remote loggers (W&B or none).

Every run describes itself at the top of its log: the resolved config, git SHA,
Python/PyTorch versions and the device (nvidia-smi on CUDA), as the records do.
"""

from __future__ import annotations

import netrc
import os
import platform
import subprocess
import uuid
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

WANDB_ID_FILE = "wandb_run_id"


class RunLog:
    """Prints on rank 0 and appends the same lines to `run_dir/train.log`."""

    def __init__(self, run_dir: Path | None, *, master: bool):
        self.master = master
        self.path = run_dir / "train.log" if (run_dir is not None and master) else None

    def __call__(self, msg: str, console: bool = True) -> None:
        if not self.master:
            return
        if console:
            print(msg, flush=True)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                print(msg, file=f)


def git_sha() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def describe_environment(device: torch.device) -> str:
    lines = [f"git_sha: {git_sha()}", f"python: {sys.version.split()[0]}", f"torch: {torch.__version__}",
             f"platform: {platform.platform()}", f"device: {device}"]
    if device.type == "cuda":
        lines.append(f"gpu: {torch.cuda.get_device_name(device)} x{torch.cuda.device_count()}")
        try:
            lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout)
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        lines.append(f"cpu_threads: {torch.get_num_threads()}")
    return "\n".join(lines)


class NullLogger:
    """`logger=none`: nothing leaves the machine (train.log and metrics.json are still written)."""

    def __init__(self, **_: Any):
        pass

    def start(self, *, config: dict, run_dir: Path, log: RunLog, resuming: bool = False) -> None:
        pass

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'optimizer': {'muon_weight_decay': 0.04}} -> {'optimizer.muon_weight_decay': 0.04}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class WandbLogger:
    """`logger=wandb`: config, train/val curves and final metrics to Weights & Biases (rank 0).

    Honours WANDB_MODE. With no credentials and no WANDB_MODE it runs offline and prints
    the `wandb sync` command instead of prompting; it never asks for input.
    """

    def __init__(self, *, project: str = "pgolf", entity: str | None = None, mode: str | None = None,
                 group: str | None = None, name: str | None = None, job_type: str | None = None,
                 tags: list[str] | None = None, summary_metric: str = "final/quant_sliding_bpb"):
        self.kwargs = dict(project=project, entity=entity, group=group, name=name, job_type=job_type,
                           tags=list(tags or []))
        self.mode = mode
        self.summary_metric = summary_metric
        self.run = None

    def start(self, *, config: dict, run_dir: Path, log: RunLog, resuming: bool = False) -> None:
        import wandb

        mode = self.mode or os.environ.get("WANDB_MODE") or ("online" if wandb_has_credentials() else "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        # One W&B run per run, however often it is resumed or requeued: its id lives in the run dir and
        # every attempt that continues it resumes it (W&B's `resume="allow"`), so history goes on at the
        # resumed step. A run that starts over in the directory (nothing to resume) is a new W&B run.
        id_file = Path(run_dir) / WANDB_ID_FILE
        keep = resuming and id_file.is_file()
        run_id = id_file.read_text().strip() if keep else uuid.uuid4().hex[:8]
        if not keep:
            tmp = id_file.with_name(f".{id_file.name}.tmp{os.getpid()}")
            tmp.write_text(run_id + "\n")
            os.replace(tmp, id_file)
        self.run = wandb.init(dir=str(run_dir), mode=mode, config=flatten(config), reinit="finish_previous",
                              id=run_id, resume="allow",
                              settings=wandb.Settings(console="off", x_disable_stats=True), **self.kwargs)
        # Sweeps compare runs by their headline metric: minimize it, and keep the best value.
        self.run.define_metric(self.summary_metric, summary="min")
        log(f"wandb: mode={mode} run={self.run.id} dir={self.run.dir}")
        if mode == "offline":  # every attempt of a resumed run is one offline dir; sync them all, in order
            log(f"wandb: offline run; upload later with `wandb sync {Path(run_dir) / 'wandb'}/offline-run-*-{run_id}`")

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in metrics.items():
                self.run.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
