"""Every notebook runs top to bottom on a fresh kernel, and shows at least one plot."""

import glob
import os

import pytest
from helpers import X64

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))

nbformat = pytest.importorskip("nbformat", reason="the `notebooks` extra is not installed")
nbclient = pytest.importorskip("nbclient", reason="the `notebooks` extra is not installed")
pytest.importorskip("matplotlib", reason="the `notebooks` extra is not installed")


def test_there_are_notebooks():
    names = [os.path.basename(p) for p in NOTEBOOKS]
    assert names == [
        "01_quickstart.ipynb", "02_from_pytorch.ipynb", "03_newton_cg.ipynb", "04_curvature.ipynb",
        "05_hessian_free.ipynb", "06_dataset_curvature.ipynb",
    ]


@pytest.mark.slow
@pytest.mark.skipif(X64, reason="the notebooks run once, in the suite's default (float32) pass")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on any error
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, "a notebook must show at least one plot"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_with_outputs_of_a_real_run(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "commit notebooks executed"
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), "executed top to bottom, in one run"
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))
