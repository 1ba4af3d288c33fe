"""docs/tutorial.ipynb runs top to bottom (so it cannot rot), and no cell prints a tensor dump."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tutorial_runs_and_prints_no_tensor(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "docs" / "tutorial.ipynb", as_version=4)
    env_path = os.environ.get("PYTHONPATH", "")
    # the kernel is this interpreter, importing this checkout's package
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env_path) if p)
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ["PYTHONPATH"] = env_path
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", out
            data = out.get("data", {})
            texts.append(out.get("text", "") + data.get("text/plain", "") + data.get("text/html", ""))
    blob = "\n".join(texts)
    assert "tensor(" not in blob and "array([" not in blob
    assert "Trace(answer=" in blob and "Results(model='toy'" in blob and "image/png" in str(nb.cells)
    assert sys.executable  # the kernel spec resolves to this interpreter (ipykernel's native kernel)
