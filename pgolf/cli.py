"""What `run.py` does around a job: check the command line first, report errors in one line.

A single run's overrides are composed and checked before Hydra makes a run directory
(nothing half-written). A job that fails inside a multirun records its failure in its own
directory and returns, so the sweep goes on; a single run exits non-zero.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from pgolf.build import build, compose, train
from pgolf.errors import PgolfError

# Command-line arguments that are Hydra's own, not config overrides.
HYDRA_FLAGS = {"-m", "--multirun", "--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve",
               "--shell-completion", "-sc", "--version", "--package", "-p", "--run", "-r", "--experimental-rerun"}


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def precheck_argv(argv: list[str]) -> None:
    """Compose and check a single run's overrides before Hydra starts (multirun jobs check themselves)."""
    if any(a in HYDRA_FLAGS or a.split("=")[0] in HYDRA_FLAGS for a in argv):
        return
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
    except PgolfError as exc:
        fail(str(exc))


def run_guarded(cfg, *, run_dir: str, multirun: bool) -> float:
    """Train one job; return the headline metric (what a sweeper minimizes)."""
    try:
        metrics = train(cfg, run_dir=run_dir)
        return float(metrics["final/quant_sliding_bpb"])
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
