"""The core install is TensorFlow-free: TensorFlow, TFDS and TensorBoard come only with extras."""

import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
OPTIONAL = ("tensorflow", "tensorflow_datasets", "tensorboard", "clu")


def test_core_dependencies_name_no_tensorflow():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    for name in ("tensorflow", "tensorboard", "clu"):
        assert name not in core
    extras = project["optional-dependencies"]
    assert any(d.startswith("tensorboard") for d in extras["tensorboard"])
    assert any(d.startswith("tensorflow-datasets") for d in extras["tfds"])
    # A GPU machine must not get TensorFlow's CUDA build: x86-64 gets the CPU wheel.
    assert "tensorflow-cpu>=2.16,<2.22; platform_machine == 'x86_64'" in extras["tfds"]


def test_every_module_imports_and_logs_metrics_without_the_extras(tmp_path):
    """With TensorFlow, TFDS, TensorBoard and clu unimportable, as in a lean venv."""
    program = textwrap.dedent(f"""
        import importlib, json, pkgutil, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {OPTIONAL!r}:
                    raise ImportError("blocked " + name)
        sys.meta_path.insert(0, Block())
        import jaxdpdm
        names = [m.name for m in pkgutil.walk_packages(jaxdpdm.__path__, "jaxdpdm.")]
        for name in names:
            importlib.import_module(name)
        from jaxdpdm.monitoring import MetricsLogger
        logger = MetricsLogger({str(tmp_path)!r}, num_steps=2)
        logger.write(1, {{"loss": 0.5}})
        logger.close()
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {OPTIONAL!r})
        print(json.dumps({{"modules": len(names), "optional_loaded": loaded}}))
    """)
    proc = subprocess.run([sys.executable, "-c", program], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = __import__("json").loads(proc.stdout.splitlines()[-1])
    assert result["modules"] > 20 and result["optional_loaded"] == []
    assert (tmp_path / "metrics.jsonl").read_text().startswith('{"step": 1')
