"""Execute every notebook in notebooks/ top to bottom (nbclient), on the tiny data.

The kernel is the ``python3`` kernel of *this* interpreter (a kernel spec written to a
temporary JUPYTER_PATH, so a system-wide ``python3`` spec pointing at another Python cannot be
picked up); the working directory is the repository root. Notebooks are committed without
outputs; the test also checks that.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """JUPYTER_PATH with a python3 kernel spec of sys.executable; small-machine settings."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (pyro_pvae test)", "language": "python"}))
    env = {
        "JUPYTER_PATH": os.pathsep.join([str(root), os.environ.get("JUPYTER_PATH", "")]).rstrip(os.pathsep),
        "OMP_NUM_THREADS": "1",          # small shared CI machines: one intra-op thread is faster
        "PYRO_PVAE_EPOCHS": "20",        # posterior_analysis fits the tiny simulation for this long
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("PYRO_PVAE_RUN", raising=False)  # the notebook fits its own tiny run
        yield


def test_notebooks_found():
    names = {p.name for p in NOTEBOOKS}
    assert "posterior_analysis.ipynb" in names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stripped(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, \
                f"{path.name}: commit notebooks without outputs (e.g. jupyter nbconvert --clear-output)"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, kernel_env):
    from jupyter_client.kernelspec import KernelSpecManager

    assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600, allow_errors=False,
                                     resources={"metadata": {"path": str(REPO)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell failed:\n{str(e)[-3000:]}")
    n_code = sum(c.cell_type == "code" for c in nb.cells)
    assert sum(c.cell_type == "code" and c.execution_count is not None for c in nb.cells) == n_code
    if path.name == "posterior_analysis.ipynb":  # forest, PIP, DAG, programs, PPC x3 figures
        images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                  if "image/png" in o.get("data", {})]
        assert len(images) >= 7, f"only {len(images)} figures rendered"
