"""One live job per directory: a lock file that names its holder.

Two jobs writing one run directory mix their config, log, metrics and artifact. A job
holds `<dir>/.lock` (an exclusive `flock` on a file that says `pid N host H`) from before it
writes anything until it exits. The kernel drops the flock when the holder dies, however it
dies, so a lock left by a killed job is detected as stale and taken over: that is how a
requeued SLURM job (or `resume=DIR`) continues in its own directory. A job that finds the
lock held by a live process refuses with one line and writes nothing there. A directory is
known by its resolved path, so `run`, `./x/../run`, `/abs/run` and a symlink to it are one.

torchrun workers share their job's directory: only rank 0 takes the lock, and workers that
a job launches itself inherit it (PGOLF_LOCK_HOLDER names the launching process).
"""

from __future__ import annotations

import atexit
import fcntl
import os
import socket
from pathlib import Path

from pgolf.errors import PgolfError

LOCK_NAME = ".lock"
HOLDER_ENV = "PGOLF_LOCK_HOLDER"
_held: dict[Path, int] = {}  # directory -> open file descriptor holding its flock


class RunDirBusy(PgolfError):
    """The directory is held by another live job: report it and write nothing there."""


def me() -> str:
    return f"pid {os.getpid()} host {socket.gethostname()}"


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "an unknown process"
    except OSError:
        return "an unknown process"


def hold(run_dir: str | os.PathLike) -> str | None:
    """Hold `run_dir` for this process (idempotent; creates the directory). Returns the stale
    holder's line when a dead job's lock was taken over, else None. Raises RunDirBusy."""
    run_dir = Path(run_dir).resolve()  # one directory however it is spelled (relative, `..`, a symlink)
    if run_dir in _held:
        return None
    path = run_dir / LOCK_NAME
    if path.is_file() and not _free(path):  # checked before creating anything
        raise _busy(run_dir, path)
    run_dir.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if _inherited(path):
                return None
            raise _busy(run_dir, path) from None
        try:  # a holder that released it may have unlinked the file we opened: lock the current one
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    stale = os.read(fd, 4096).decode(errors="replace").strip() or None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{me()}\n".encode(), 0)
    _held[run_dir] = fd
    atexit.register(release, run_dir)
    return stale


def _free(path: Path) -> bool:
    """Whether nobody (alive) holds the lock file; probing opens it read-only, so writes nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return _inherited(path)
    finally:
        os.close(fd)


def _inherited(path: Path) -> bool:
    """Workers started by the job that holds the lock (launch_workers) run under its lock."""
    owner = os.environ.get(HOLDER_ENV)
    return owner is not None and _holder(path) == owner


def _busy(run_dir: Path, path: Path) -> RunDirBusy:
    return RunDirBusy(f"{run_dir} is in use by a live run ({_holder(path)}, see {path}); wait for it to end or "
                      "pick another directory (hydra.run.dir / hydra.sweep.dir)")


def release(run_dir: str | os.PathLike) -> None:
    """Give the directory up: remove the lock file, then drop the flock."""
    run_dir = Path(run_dir).resolve()
    fd = _held.pop(run_dir, None)
    if fd is None:
        return
    try:
        (run_dir / LOCK_NAME).unlink(missing_ok=True)
    except OSError:
        pass
    os.close(fd)
