"""The notebooks in notebooks/: committed without outputs, and each runs top to bottom.

A notebook runs in a fresh kernel (ipykernel's "python3", from the test extra) with its
folder as the working directory, as Jupyter starts it, and JAXFT_NOTEBOOK_SMOKE=1: its
parameters cell then picks a short schedule and a few records (about a minute on 2 CPU cores).
"""

import json
import os
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("quickstart.ipynb", "ablation.ipynb")


def _kernel_env(workdir: Path) -> dict:
    """The test process's environment without conftest's 8 virtual devices (a user's kernel
    sees the host as it is), in smoke mode, writing under `workdir`."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    env.update(JAXFT_NOTEBOOK_SMOKE="1", JAXFT_NOTEBOOK_WORKDIR=str(workdir), JAX_PLATFORMS="cpu")
    return env


def execute(name: str, workdir: Path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute(env=_kernel_env(workdir))  # a failing cell raises CellExecutionError with its traceback
    return nb


def _outputs(nb, mime: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if mime in o.get("data", {})]


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_are_committed_without_outputs(name):
    nb = json.loads((NOTEBOOKS / name).read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, name
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
             and (c["outputs"] or c["execution_count"] is not None)]
    assert not dirty, f"{name}: cells {dirty} have outputs or execution counts: clear them before committing"
    assert "parameters" in code[0]["metadata"].get("tags", []), f"{name}: the first code cell is the parameters cell"
    badge = f"https://colab.research.google.com/github/jaxft/jaxft/blob/main/notebooks/{name}"
    assert badge in "".join(nb["cells"][0]["source"]), f"{name}: no Open in Colab badge in the first cell"


def test_quickstart_notebook_runs(tmp_path):
    nb = execute("quickstart.ipynb", tmp_path)
    for stage in ("sft", "dpo"):
        assert (tmp_path / stage / "hf" / "model.safetensors").is_file()
        assert (tmp_path / stage / "metrics.png").is_file()
    assert len(_outputs(nb, "image/png")) >= 3  # SFT and DPO loss curves, DPO rewards
    tables = "".join(o["data"]["text/markdown"] for o in _outputs(nb, "text/markdown"))
    assert "| DPO |" in tables and "What is 3 + 4?" in tables


def test_ablation_notebook_runs(tmp_path):
    nb = execute("ablation.ipynb", tmp_path)
    for run in ("sft", "loss_type=sigmoid", "loss_type=sigmoid,sft"):
        assert json.loads((tmp_path / run / "sweep_run.json").read_text())["status"] == "finished"
    assert (tmp_path / "loss_type=sigmoid" / "hf" / "model.safetensors").is_file()
    assert (tmp_path / "compare.csv").is_file() and (tmp_path / "compare.png").is_file()
    assert _outputs(nb, "image/png"), "the comparison plot is shown inline"
    assert _outputs(nb, "text/markdown"), "the comparison table is shown"
