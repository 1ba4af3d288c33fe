"""Who may write a run directory, and what may already be in it.

* `claim_out(out, resume)` — checked before a model loads: `--out` must be a new or empty
  directory, or (with --resume) one that holds a run. A file, or a directory holding other
  things, is refused: a run never takes over files it did not write.
* `RunLock(out)` — one process owns a run directory while it writes there: an exclusive
  `flock` on `.thoughtpatch.lock` inside it. A second run, resume, merge or report on the same
  directory is refused with the holder's pid. The kernel drops the lock when its process
  dies, so the file a killed run leaves behind never blocks the next one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from thoughtpatch.errors import ThoughtpatchError

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".thoughtpatch.lock"
MANIFEST = "manifest.json"


def read_manifest(run_dir: Path) -> dict | None:
    """The run's manifest, None when there is none, a one-line error when it is damaged."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ThoughtpatchError(f"{path}: damaged ({e}); not a run thoughtpatch can continue") from None
    if not isinstance(m, dict) or "result_config" not in m or "model" not in m:
        raise ThoughtpatchError(f"{path}: not a thoughtpatch manifest")
    return m


def claim_out(out: Path, resume: bool, allowed: frozenset[str] = frozenset(), again: str = "pass --resume to continue it") -> dict | None:
    """Refuse an --out this run may not write into; returns the manifest of the run being
    resumed (None for a new run). `allowed`: names that may be present without a manifest
    (the shard directories of an `accelerate launch` run)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ThoughtpatchError(f"--out {out}: is a file, not a directory")
    if not out.exists():
        return None
    manifest = read_manifest(out)
    if manifest is not None:
        if not resume:
            raise ThoughtpatchError(f"{out} already holds a run; {again} or choose another --out")
        return manifest
    other = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME and p.name not in allowed)
    if other:
        more = f" (+{len(other) - 3} more)" if len(other) > 3 else ""
        raise ThoughtpatchError(
            f"--out {out}: not empty and not a thoughtpatch run (holds {', '.join(other[:3])}{more}); choose a new or empty directory"
        )
    return None


class RunLock:
    """Exclusive ownership of a run directory by this process (see the module docstring).
    Created with the directory when needed; `created` tells whether this lock made it."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK_NAME
        self.created = False
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.created = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ThoughtpatchError(
                    f"{self.dir}: in use by another thoughtpatch process (pid {holder}); wait for it to finish"
                ) from None
            # The previous owner may have removed the file between our open and our lock:
            # then we hold a lock on a name nobody else sees; take the current file instead.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # still held: nobody can own it in between
            os.close(self._fd)
            self._fd = None
        if exc_type is not None and self.created:
            try:  # a directory this lock made and nothing was written to: leave no trace
                self.dir.rmdir()
            except OSError:
                pass
