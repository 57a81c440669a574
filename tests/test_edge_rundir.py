"""A run directory is one directory however its path is spelled (issue 21 item 8): relative,
absolute, with `.` or `..`, or through a symlink, the lock (and so resume and the W&B id file,
which live in the directory the trainer resolves) follow the directory, not the string."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from runs import ROOT

from pgolf.rundir import LOCK_NAME, RunDirBusy, hold, release

HOLDER = ("import sys, time; from pgolf.rundir import hold; hold(sys.argv[1]); print('held', flush=True); "
          "time.sleep(600)")


def spellings(tmp_path):
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "sub").mkdir(exist_ok=True)
    link = tmp_path / "link"
    if not link.exists():
        link.symlink_to(tmp_path / "run")
    rel = os.path.relpath(tmp_path / "run")
    return [tmp_path / "run", tmp_path / "sub" / ".." / "run", tmp_path / "." / "run", link, rel]


def test_one_process_holds_one_directory_under_every_spelling(tmp_path):
    names = spellings(tmp_path)
    assert hold(names[0]) is None
    for name in names[1:]:
        assert hold(name) is None  # idempotent: the same directory, not a second lock
    release(names[3])  # released through the symlink
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    assert all(hold(n) is None for n in names)
    release(names[1])
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_another_spelling_of_a_held_directory_is_refused(tmp_path):
    names = spellings(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(names[0])], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "held"
        for name in names[1:]:
            with pytest.raises(RunDirBusy) as e:
                hold(name)
            assert str(tmp_path / "run") in str(e.value) and "\n" not in str(e.value)
    finally:
        proc.kill()
        proc.wait()
