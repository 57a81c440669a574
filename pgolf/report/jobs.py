"""Reading a Hydra sweep: one `Job` per directory holding `.hydra/overrides.yaml`.

A job is `finished` or `failed` by its metrics.json (written by `pgolf.trainer.finish` and
`pgolf.cli.run_guarded`); a job with no or an unreadable metrics.json died hard or is still
running, and counts as `unfinished`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pgolf.errors import PgolfError

DEFAULT_KEY = "(default)"  # the group of jobs with no overrides besides seed


@dataclass
class Job:
    dir: Path
    sweep: Path            # the directory it was found under (a MULTIRUN_DIR argument)
    overrides: list[str]   # the job's overrides without seed, sorted
    seed: str | None
    status: str            # finished | failed | unfinished
    error: str = ""
    metrics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    @property
    def group(self) -> str:
        return ",".join(self.overrides) or DEFAULT_KEY


def override_key(override: str) -> str:
    """`+optimizer.lr=0.1` -> `optimizer.lr`."""
    return override.split("=", 1)[0].strip().lstrip("+~")


def natural(path: Path) -> list:
    """Sort key that puts job 2 before job 10."""
    return [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in path.parts]


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PgolfError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None


def read_metrics(path: Path) -> tuple[str, str, dict]:
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        return "unfinished", "", {}
    except (OSError, ValueError):
        return "unfinished", "unreadable metrics.json", {}
    status = m.get("status") if isinstance(m, dict) else None
    if status == "finished":
        return status, "", m
    if status == "failed":
        return status, str(m.get("error", "")), m
    return "unfinished", f"metrics.json has status {status!r}", {}


def read_job(job_dir: Path, sweep: Path | None = None) -> Job:
    """One Hydra job directory: its overrides (seed split off), status, metrics and composed config."""
    overrides = [str(o) for o in (_read_yaml(job_dir / ".hydra/overrides.yaml") or [])]
    config_path = job_dir / ".hydra/config.yaml"
    config = (_read_yaml(config_path) if config_path.exists() else None) or {}
    seeds = [o.split("=", 1)[1].strip() for o in overrides if override_key(o) == "seed" and "=" in o]
    seed = seeds[-1] if seeds else (str(config["seed"]) if "seed" in config else None)
    status, error, metrics = read_metrics(job_dir / "metrics.json")
    kept = sorted(o.strip() for o in overrides if override_key(o) != "seed")
    return Job(job_dir, sweep or job_dir, kept, seed, status, error, metrics, config)


def load_jobs(dirs: list[str | Path]) -> list[Job]:
    """Every job under each directory; each directory must hold at least one finished job."""
    jobs, seen = [], set()
    for d in map(Path, dirs):
        if not d.is_dir():
            raise PgolfError(f"{d} is not a directory (give a multirun dir such as multirun/2026-03-20_12-00-00)")
        found = sorted((p.parent.parent for p in d.rglob(".hydra/overrides.yaml")), key=natural)
        if not found:
            raise PgolfError(f"no Hydra jobs (*/.hydra/overrides.yaml) under {d}")
        new = [read_job(j, d) for j in found if j.resolve() not in seen]  # a dir given twice counts once
        seen.update(j.dir.resolve() for j in new)
        if not any(j.status == "finished" for j in new):
            failed = [j for j in new if j.status == "failed"]
            first = f"; first error ({failed[0].dir}): {failed[0].error}" if failed else ""
            raise PgolfError(f"no finished jobs in {d} ({len(failed)} failed, {len(new) - len(failed)} unfinished)"
                             + first)
        jobs += new
    return jobs
