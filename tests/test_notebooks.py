"""Both notebooks execute headlessly, the analysis one against a real sweep of this session."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["continuum_analysis.ipynb", "block_tour.ipynb"])
def test_notebook_runs_without_error(name, tiny_sweep, monkeypatch):
    monkeypatch.setenv("TOWERSPACE_RESULTS", str(tiny_sweep.sweep_dir))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})  # fmt: skip
    client.execute()  # raises CellExecutionError on the first failing cell
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]  # fmt: skip
    assert len(images) == (7 if name == "continuum_analysis.ipynb" else 1)
    if name == "continuum_analysis.ipynb":
        table_html = nb.cells[3].outputs[0]["data"]["text/html"]
        assert table_html.count("<tr>") == 6  # the six trials of the tiny sweep (header aside)


def test_committed_notebooks_carry_their_outputs():
    for name in ("continuum_analysis.ipynb", "block_tour.ipynb"):
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.outputs for c in code[1:]), f"{name}: run it and save it with outputs"
