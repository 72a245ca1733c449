"""Tier 4: every notebook in notebooks/ runs top to bottom, offline, on its reduced setting (ZOO_NOTEBOOK_SMOKE=1).
Cells tagged `colab-install` (the Colab `%pip install` cell) are skipped: the package is installed already."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.notebooks
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_offline(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    install = [c for c in nb.cells if "colab-install" in c.metadata.get("tags", [])]
    assert install and nb.cells.index(install[0]) <= 1, "the first code cell must install the package for Colab"
    nb.cells = [c for c in nb.cells if c not in install]
    monkeypatch.setenv("ZOO_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # anything a notebook writes stays out of the checkout
    NotebookClient(nb, timeout=900, kernel_name="python3").execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
