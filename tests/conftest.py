"""Shared test helpers: where the repository and its fixtures are."""

from __future__ import annotations

import os

# CODI's bf16 reference was recorded with oneDNN's AVX-512 bf16 GEMMs; AMX kernels round a
# few elements differently. The cap is read when torch is imported, so it is set here, first.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
# Two worker processes (pytest -n 2): one thread each, and the command-line runs the tests
# start inherit it, so in-process and subprocess runs add in the same order.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Golden references and real-data samples, derived by tests/fixtures/make_fixtures.py.
FIXTURES = REPO / "tests" / "fixtures"


def pytest_collection_modifyitems(config, items):
    """Under `-n 2 --dist loadgroup` a test module runs in one worker (its module fixtures are
    built once), and so do all of tests/report, whose session fixtures are whole runs."""
    import pytest

    def in_report(item) -> bool:
        return Path(str(item.fspath)).relative_to(REPO).parts[:2] == ("tests", "report")

    for item in items:
        item.add_marker(pytest.mark.xdist_group("report" if in_report(item) else str(Path(str(item.fspath)).relative_to(REPO))))
    # The report group is the largest unit: first, so that one worker starts on it while the
    # other takes the many small modules (otherwise it may start last and run alone).
    items.sort(key=lambda item: not in_report(item))


def run_cli(*args: str):
    """The `thoughtpatch` entry point in this process, as subprocess.run would report it
    (returncode, stdout, stderr): a subprocess spends seconds on imports. Tests of process
    behaviour (a kill, a lock, a launcher, the console script) start a real process."""
    import contextlib
    import io
    import sys
    from types import SimpleNamespace

    import pytest

    from thoughtpatch.cli import main

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setattr(sys, "argv", ["thoughtpatch", *args])
        with pytest.raises(SystemExit) as e:  # the entry point always exits, as a process would
            main()
    return SimpleNamespace(returncode=e.value.code or 0, stdout=out.getvalue(), stderr=err.getvalue())
