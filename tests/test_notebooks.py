"""Executes the notebooks under experiments/notebooks/ so they cannot rot (nbclient, the python3 kernel).

They are committed with their outputs (figures inline), so a reader sees the results on the repository page; the
execution here starts from the code and checks that it still runs."""
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


def test_notebooks_exist_with_their_outputs():
  assert {p.stem for p in NOTEBOOKS} >= {"escape_time", "noise", "estimator_bias", "your_own_reward"}
  for path in NOTEBOOKS:
    book = nbformat.read(path, as_version=4)
    code = [cell for cell in book.cells if cell.cell_type == "code"]
    assert code[-1].get("outputs"), f"{path.name}: commit it executed, with its outputs"
    figures = [out for cell in code for out in cell.outputs if "image/png" in out.get("data", {})]
    assert bool(figures) == any("plt." in cell.source for cell in code), f"{path.name}: show its figures inline"
