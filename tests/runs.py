"""Running pgolf the way a user does, for the end-to-end tests: `python run.py ...` in a
subprocess (W&B offline), on short smoke jobs with a 5-document validation split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAST = ["experiment=smoke", "schedule.iterations=8", "schedule.train_log_every=4", "data.num_val_docs=5"]


def run_py(args: list[str], cwd: Path, torchrun: int = 0, env: dict | None = None) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([*launcher, str(ROOT / "run.py"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def metrics(job_dir: Path) -> dict:
    return json.loads((Path(job_dir) / "metrics.json").read_text())


def tree(path: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under `path`: to assert nothing was written."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(Path(path).rglob("*")) if p.is_file()}
