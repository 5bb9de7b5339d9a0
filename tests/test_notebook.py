"""notebooks/gpd_jax_quickstart.ipynb runs top to bottom: every cell executes, an error fails the test.

The notebook's own quick run (teacher + GPD student, :runlocal) is capped to 256 training images here
through its GPD_QUICKSTART_TRAIN_EXAMPLES variable; its workdir goes to tmp_path.
"""
import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "gpd_jax_quickstart.ipynb")
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def cell_text(cell) -> str:
  return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  assert os.path.isdir(FASHION_MNIST), ("the notebook test needs the Debian package dataset-fashion-mnist "
                                        "(`apt-get install dataset-fashion-mnist`; .ci/run installs it)")
  monkeypatch.setenv("GPD_QUICKSTART_WORKDIR", str(tmp_path / "quickstart"))
  monkeypatch.setenv("GPD_QUICKSTART_TRAIN_EXAMPLES", "256")
  # The kernel imports this checkout's gpd_jax (the notebook also puts it first on sys.path).
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(notebook, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute()  # raises CellExecutionError on the first failing cell

  code_cells = [c for c in notebook.cells if c.cell_type == "code"]
  assert all(c.get("execution_count") for c in code_cells), "a code cell did not run"
  outputs = "\n".join(cell_text(c) for c in code_cells)
  assert f"repository: {ROOT}" in outputs
  for label in ("student (exported)", "dynamic teacher", "static teacher"):
    assert label in outputs
  assert "IR   max |DT - student|" in outputs and "CBR  max |export - view|" in outputs
  assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
             for c in code_cells for o in c.get("outputs", [])), "the gap plot was not shown"
  workdir = tmp_path / "quickstart"
  assert (workdir / "export" / "model.json").is_file() and (workdir / "teacher" / "export").is_dir()
  assert (workdir / "gap_curves.png").stat().st_size > 10_000
