"""launch/colab_tpu_demo.ipynb: structure, install guards, and a headless run on CPU.

The run executes every cell in a real Jupyter kernel (nbclient) started from THIS interpreter
(`sys.executable`, not whatever "python3" kernelspec the machine has), with the ":tiny"
quickstart for 2 steps. Outside Colab the install cells are no-ops by construction (guarded by
`if IN_COLAB:`), which `test_install_commands_only_run_on_colab` checks statically.
"""

from __future__ import annotations

import ast
import json
import pathlib
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK = REPO_ROOT / "launch" / "colab_tpu_demo.ipynb"


def _notebook() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def _code(cell) -> str:
    return cell.source if isinstance(cell.source, str) else "".join(cell.source)


def test_notebook_is_valid_v4_with_a_parameters_cell():
    nb = _notebook()
    nbformat.validate(nb)
    assert nb.nbformat == 4
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code"
    names = {
        t.id for node in ast.parse(_code(tagged[0])).body if isinstance(node, ast.Assign)
        for t in node.targets
    }
    assert {"REPO_URL", "TINY", "NUM_STEPS", "TARGET_EPSILON", "WORKDIR"} <= names
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        "commit the notebook without outputs"


def test_install_commands_only_run_on_colab():
    """Every statement that clones or pip-installs sits inside an `if IN_COLAB:` block."""
    for cell in _notebook().cells:
        if cell.cell_type != "code":
            continue
        tree = ast.parse(_code(cell))
        guarded = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and ast.unparse(node.test) == "IN_COLAB":
                for inner in node.body:
                    guarded.update(range(inner.lineno, inner.end_lineno + 1))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in ("pip", "clone"):
                assert node.lineno in guarded, f"unguarded install at line {node.lineno}"


def _this_python_kernel() -> KernelManager:
    """A kernel manager whose "python3" kernel is this interpreter (with its packages)."""

    class ThisPython(KernelSpecManager):

        def get_kernel_spec(self, kernel_name, *args, **kwargs):
            return KernelSpec(
                argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                display_name="Python (tests)", language="python")

    return KernelManager(kernel_name="python3", kernel_spec_manager=ThisPython())


@pytest.mark.slow
def test_notebook_runs_headless_with_tiny_settings(tmp_path, monkeypatch):
    nb = _notebook()
    workdir = tmp_path / "run"
    position = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    # Injected after the parameters cell, as papermill does.
    nb.cells.insert(
        position + 1,
        nbformat.v4.new_code_cell(f"TINY = True\nNUM_STEPS = 2\nWORKDIR = {str(workdir)!r}"))
    # The kernel inherits this environment: CPU only, and XLA:CPU's cheap LLVM pipeline (a
    # 2-step run is dominated by compiling the UNet's programs, not by running them).
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv(
        "XLA_FLAGS", "--xla_backend_optimization_level=0 "
        "--xla_llvm_disable_expensive_passes=true")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    client = NotebookClient(nb, km=_this_python_kernel(), timeout=900,
                            resources={"metadata": {"path": str(REPO_ROOT / "launch")}})
    client.execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the sample grid is shown"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "true-positive rate <=" in text and "<- this run" in text
    assert (workdir / "grid_final.png").stat().st_size > 0
    report = json.loads((workdir / "privacy_report.json").read_text())
    assert report["mechanism"]["steps"] == 2
    assert 0 < report["guarantee"]["epsilon_pld"] <= 10.0 + 1e-9
