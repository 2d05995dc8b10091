"""Executes the theory notebooks under experiments/notebooks/ so they cannot rot (nbclient, the python3 kernel)."""
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO_ROOT / "experiments" / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  book = nbformat.read(path, as_version=4)
  NotebookClient(book, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": str(REPO_ROOT)}}).execute()
  errors = [out for cell in book.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
            if out.get("output_type") == "error"]
  assert not errors


def test_notebooks_exist():
  assert {p.stem for p in NOTEBOOKS} >= {"escape_time", "noise", "estimator_bias"}
