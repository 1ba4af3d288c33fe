"""A run directory is owned by one process; --out must be new, empty or (to resume) a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from thoughtpatch.errors import ThoughtpatchError
from thoughtpatch.report.rundir import LOCK_NAME, RunLock, claim_out

HOLD = "import sys, time; from thoughtpatch.report.rundir import RunLock; RunLock(sys.argv[1]).__enter__(); print('held', flush=True); time.sleep(120)"


def hold_lock(run_dir) -> subprocess.Popen:
    """Another process that owns `run_dir` until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_owner_is_refused_with_the_holders_pid(tmp_path):
    d = tmp_path / "run"
    holder = hold_lock(d)
    try:
        with pytest.raises(ThoughtpatchError, match=rf"{d}: in use by another thoughtpatch process \(pid {holder.pid}\)"):
            with RunLock(d):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    # The killed holder's lock file is still there, naming a dead pid: it does not block.
    assert (d / LOCK_NAME).read_text().strip() == str(holder.pid)
    with RunLock(d):
        assert (d / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert not (d / LOCK_NAME).exists()  # released: nothing left behind


def test_a_lock_that_made_its_directory_removes_it_on_failure(tmp_path):
    d = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with RunLock(d):
            raise RuntimeError("failed before writing anything")
    assert not d.exists()


def test_claim_out(tmp_path):
    assert claim_out(tmp_path / "new", resume=False) is None
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ThoughtpatchError, match="is a file, not a directory"):
        claim_out(f, resume=False)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ThoughtpatchError, match=r"not empty and not a thoughtpatch run \(holds notes.txt\)"):
        claim_out(foreign, resume=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"result_config": {}, "model": {}}))
    with pytest.raises(ThoughtpatchError, match="already holds a run; pass --resume"):
        claim_out(run, resume=False)
    assert claim_out(run, resume=True) == {"result_config": {}, "model": {}}
    (run / "manifest.json").write_text('{"result_config": ')
    with pytest.raises(ThoughtpatchError, match="manifest.json: damaged"):
        claim_out(run, resume=True)
