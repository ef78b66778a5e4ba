"""The tutorial notebooks in notebooks/ run top to bottom, offline, each in a fresh working folder.

Each notebook is executed with nbclient on the kernel named ``python3``: jupyter_client resolves
it to ipykernel's kernel spec of the running interpreter (the venv's), so nothing is registered
globally. The notebooks are stored without outputs; each writes into ``medtransfer-demo-NN/``
beside itself, here a temporary folder.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("pandas")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# What each notebook must leave behind in its working folder.
EXPECTED = {
    "01_own_folder.ipynb": ["medtransfer-demo-01/run/report.html", "medtransfer-demo-01/run/model/model.json"],
    "02_external_validation.ipynb": [
        "medtransfer-demo-02/run/report.html", "medtransfer-demo-02/site_b_evaluation/report.html",
        "medtransfer-demo-02/recalibrated/report.html", "medtransfer-demo-02/recalibrated/model/model.json",
    ],
    "03_heatmaps_shortcuts.ipynb": ["medtransfer-demo-03/run/report.html", "medtransfer-demo-03/run/plots/border/border_01.png"],
}


def test_every_notebook_is_tested_and_stored_without_outputs():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)
    for name in EXPECTED:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        assert code and all(not cell.outputs and cell.execution_count is None for cell in code), name
        assert nb.metadata.kernelspec.name == "python3"


def test_the_python3_kernel_is_the_interpreter_running_the_tests():
    from jupyter_client.manager import KernelManager

    assert KernelManager(kernel_name="python3").format_kernel_cmd()[0] == sys.executable


def _outputs(nb, output_type: str) -> list[dict]:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == output_type]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_top_to_bottom(name, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}})
    # One torch thread per kernel: on a shared CPU two spinning threads run several times slower than one.
    client.execute(env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})  # raises on a failing cell
    assert not _outputs(nb, "error")
    for relative in EXPECTED[name]:
        assert (tmp_path / relative).is_file(), relative
    html = [o.data["text/html"] for o in _outputs(nb, "execute_result") if "text/html" in o.data]
    run = json.loads((tmp_path / EXPECTED[name][0]).with_name("metrics.json").read_text())
    assert any(f"{run['test']['auc']:.3f} (95% CI" in page for page in html)  # the result table was shown
    assert _outputs(nb, "display_data"), "no figure was drawn"
