"""What `run.py` does around a job: check the command line first, report errors in one line.

A single run's overrides are composed and checked before Hydra makes a run directory
(nothing half-written). A job that fails inside a multirun records its failure in its own
directory and returns, so the sweep goes on; a single run exits non-zero.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from pgolf.build import build, compose, to_container, train
from pgolf.checkpoint import check_same_config, resume_config
from pgolf.errors import PgolfError
from pgolf.rundir import HOLDER_ENV, RunDirBusy, hold, me, release

# Command-line arguments that are Hydra's own, not config overrides.
HYDRA_FLAGS = {"-m", "--multirun", "--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve",
               "--shell-completion", "-sc", "--version", "--package", "-p", "--run", "-r", "--experimental-rerun"}


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def swept_keys(argv: list[str], sweeper_params: dict) -> set[str]:
    """Keys a multirun varies: command-line overrides with a comma list or a sweep function
    (range/choice/glob), and the sweeper params of a sweeps/*.yaml file."""
    keys = set(sweeper_params)
    for a in argv:
        if "=" not in a or a.startswith("-"):
            continue
        key, value = a.lstrip("+~").split("=", 1)
        depth = 0
        for ch in value:
            if ch in "[{(":
                depth += 1
            elif ch in "]})":
                depth -= 1
            elif ch == "," and depth == 0:
                keys.add(key)
        if value.startswith(("range(", "choice(", "glob(")):
            keys.add(key)
    return keys


def _arg(argv: list[str], key: str) -> str | None:
    return next((a.split("=", 1)[1] for a in argv if a.startswith(key + "=")), None)


def hold_dir(run_dir: str) -> None:
    """Take the directory's lock before anything is written there (rank 0 only; see pgolf.rundir)."""
    if os.environ.get("RANK", "0") != "0":
        return
    stale = hold(run_dir)
    if stale:
        print(f"run_dir: {run_dir} was locked by {stale}, which is gone; continuing there", flush=True)


def precheck_argv(argv: list[str]) -> list[str]:
    """Compose and check a single run's overrides before Hydra starts (multirun jobs check themselves),
    and take the lock of an explicitly named run or sweep directory before Hydra writes there.
    Returns arguments to add: `resume=DIR` continues in DIR, so Hydra's run dir becomes DIR."""
    sweep_dir = _arg(argv, "hydra.sweep.dir")
    if any(a in ("-m", "--multirun") for a in argv) and sweep_dir and "${" not in sweep_dir:
        try:  # two sweeps given one sweep dir would write the same job dirs (interpolated ones are made unique)
            hold_dir(sweep_dir)
        except PgolfError as exc:
            fail(str(exc))
    if any(a in HYDRA_FLAGS or a.split("=")[0] in HYDRA_FLAGS for a in argv):
        return []
    overrides, config_dir, config_name = [], None, "config"
    it = iter(argv)
    for a in it:
        for flag, long in (("-cd", "--config-dir"), ("-cn", "--config-name"), ("-cp", "--config-path")):
            if a in (flag, long) or a.startswith(long + "="):
                value = a.split("=", 1)[1] if "=" in a else next(it, "")
                if long == "--config-dir":
                    config_dir = value
                elif long == "--config-name":
                    config_name = value
                break
        else:
            if not a.startswith("hydra.") and not a.startswith("hydra/") and not a.startswith("-"):
                overrides.append(a)
    try:
        if config_dir is None:
            cfg = compose(overrides, config_name=config_name)
        else:
            from pgolf.build import CONF_DIR

            cfg = compose(overrides + [f"hydra.searchpath=[file://{CONF_DIR}]"], config_name=config_name,
                          config_dir=config_dir)
        data = build(cfg, "data")
        if data.source is None:  # pre-built shards: check they exist (built sources are made in the job)
            data.ensure()
        if cfg.get("resume"):
            check_resume(cfg.resume, to_container(cfg))
        run_dir = _arg(argv, "hydra.run.dir") or cfg.get("resume")
        if run_dir:  # a generated run dir (outputs/<time>_<uuid>) is new; the job locks it itself
            hold_dir(run_dir)
        if cfg.get("resume") and not _arg(argv, "hydra.run.dir"):
            return [f"hydra.run.dir={cfg.resume}"]
    except PgolfError as exc:
        fail(str(exc))
    return []


def check_resume(resume: str, config: dict) -> None:
    """`resume=DIR` must hold a checkpoint or finished training made with this config (checked
    before anything is written)."""
    source, saved = resume_config(Path(resume))
    check_same_config(source, saved, config)


@dataclass(frozen=True, kw_only=True)
class Launch:
    """The `distributed` group: how many worker processes one job runs on this node."""

    nproc_per_node: int = 1

    def __post_init__(self):
        if self.nproc_per_node < 1 or 8 % self.nproc_per_node:
            raise PgolfError(f"distributed.nproc_per_node={self.nproc_per_node} must divide 8 (1, 2, 4 or 8)")

    def needs_launch(self) -> bool:
        return self.nproc_per_node > 1 and "RANK" not in os.environ


def launch_workers(nproc: int, overrides: list[str], run_dir: str) -> dict:
    """Run this job as `torchrun --standalone --nproc_per_node=N run.py <overrides>` in run_dir.

    The workers share the job's directory; when the launcher returns they are gone, so the
    next job of a sweep starts on a free machine.
    """
    run_py = Path(__file__).resolve().parent.parent / "run.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(run_py),
           *[o for o in overrides if not o.startswith("hydra.run.dir=")], f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, env=dict(os.environ, PGOLF_RUN_ID=Path(run_dir).resolve().name, **{HOLDER_ENV: me()}))
    metrics_path = Path(run_dir) / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    if proc.returncode != 0 or metrics.get("status") != "finished":
        raise PgolfError(metrics.get("error") or f"{nproc} workers exited with code {proc.returncode}; see {run_dir}")
    return metrics


def adopt_slurm_ranks() -> None:
    """Under a submitit/SLURM launcher with several tasks, each task is one rank: export the
    torch.distributed variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) from SLURM's."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1 or "SUBMITIT_FOLDER" not in os.environ:
        return
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export()


def run_guarded(cfg, *, run_dir: str, multirun: bool, overrides: list[str] = ()) -> float:
    """Train one job (launching its workers if asked); return the headline metric for a sweeper."""
    adopt_slurm_ranks()
    try:
        hold_dir(run_dir)
    except RunDirBusy as exc:  # another live job's directory: write nothing there
        if multirun:
            print(f"error: job in {run_dir} not run: {exc}", file=sys.stderr, flush=True)
            return float("nan")
        fail(str(exc))
    try:
        launch = build(cfg, "distributed") if "distributed" in cfg else Launch()
        if launch.needs_launch():
            labels = [f"logger.{k}='{cfg.logger[k]}'" for k in ("group", "name", "job_type")
                      if "logger" in cfg and cfg.logger.get(k) is not None and not any(
                          o.startswith(f"logger.{k}=") for o in overrides)]
            metrics = launch_workers(launch.nproc_per_node, [*overrides, *labels], run_dir)
        else:
            metrics = train(cfg, run_dir=run_dir)
        # the headline: the TTT score when eval.ttt is on, else the quantized sliding score
        return float(metrics.get("final/ttt_bpb", metrics["final/quant_sliding_bpb"]))
    except (PgolfError, Exception) as exc:
        user_error = isinstance(exc, PgolfError)
        message = str(exc) if user_error else f"{type(exc).__name__}: {exc}"
        if int(os.environ.get("RANK", 0)) == 0:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            status = {"status": "failed", "error": message.splitlines()[0] if message else type(exc).__name__}
            tmp = Path(run_dir) / ".metrics.json.tmp"
            tmp.write_text(json.dumps(status, indent=2) + "\n")
            os.replace(tmp, Path(run_dir) / "metrics.json")
            if not user_error:
                (Path(run_dir) / "error.txt").write_text(traceback.format_exc())
        if multirun:
            print(f"error: job in {run_dir} failed: {message}", file=sys.stderr, flush=True)
            return float("nan")
        if not user_error:
            raise
        fail(message)
        return float("nan")
    finally:
        release(run_dir)
