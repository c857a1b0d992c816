"""Every notebook runs top to bottom in a real Jupyter kernel (nbclient) and is committed
with its outputs stripped."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, path.name


# The default suite executes the one notebook that trains nothing (~6 s); the others train
# models for 20-80 s each and run in `make test-all`.
QUICK = {"02_sparsity_explorer.ipynb"}


@pytest.mark.parametrize("path", [
    pytest.param(p, id=p.name, marks=() if p.name in QUICK else pytest.mark.slow)
    for p in NOTEBOOKS])
def test_notebook_executes_without_errors(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError naming the cell on any error
    nbformat.write(nb, tmp_path / path.name)  # executed copy, for inspection on failure
