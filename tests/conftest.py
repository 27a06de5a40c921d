"""Shared pytest fixtures.

`run_multidevice` runs a Python snippet in a fresh interpreter whose JAX sees several simulated
CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N` must be set before jax is
imported, which the pytest process has already done with one device). Usage:

    def test_something(run_multidevice):
        out = run_multidevice('''
            import jax
            result = {"devices": jax.device_count()}
        ''')
        assert out == {"devices": 8}

The snippet (dedented automatically) must assign a JSON-serialisable value to `result`; that value
is returned. Anything else the snippet prints is ignored. The repository root is the working
directory and is on `sys.path`, so `import jaxdpdm` and paths such as "tests/x.py" work. A failing
snippet fails the test with the tail of its stderr. Keep snippets small: each call pays a fresh
jax import and fresh compilations, so put all multi-device checks of a file in one call.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

# The optional reference packages (torch's CUDA build pulls in triton) crash the interpreter when
# they are imported after TensorFlow, which TFDS loads (and tensorboard's event writer, where
# TensorFlow is installed). Import them first, where present.
try:
    import pytorch_fid.fid_score  # noqa: F401
    import pytorch_fid.inception  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401
except ImportError:
    pass
try:  # torch imports triton lazily (torch.optim's first optimizer loads torch._dynamo)
    import triton  # noqa: F401
except ImportError:
    pass

# Compiled programs are cached on disk and shared by this process and the subprocesses it
# starts (they inherit the environment): the suite compiles each (model, shape) once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "jaxdpdm-test-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
_RESULT_MARKER = "__JAXDPDM_SUBPROCESS_RESULT__"


def pytest_collection_modifyitems(config, items):
    """Files holding a `slow` test first, each file's tests kept together and in order.

    Workers take whole files in this order (pyproject: --dist loadfile --no-loadscope-reorder).
    Started last, one slow end-to-end file would leave the other cores idle for its minutes."""
    del config
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: keeps the order within


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): one worker per core, at most 4. Each worker imports jax
    and compiles its own programs; more workers than that only cost memory."""
    return max(1, min(4, os.cpu_count() or 1))


def run_python_with_devices(code: str, *, num_devices: int = 8, timeout: float = 600.0):
    """Runs `code` with `num_devices` simulated CPU devices; returns its JSON `result`."""
    env = os.environ.copy()
    flags = [
        f for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={num_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    program = (textwrap.dedent(code) +
               f"\nimport json as _json\nprint({_RESULT_MARKER!r} + _json.dumps(result))\n")
    proc = subprocess.run([sys.executable, "-c", program], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(
            f"subprocess with {num_devices} devices failed (exit {proc.returncode}):\n"
            f"{proc.stderr[-4000:]}", pytrace=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARKER):
            return json.loads(line[len(_RESULT_MARKER):])
    pytest.fail(f"subprocess printed no result; stdout tail:\n{proc.stdout[-2000:]}", pytrace=False)


@pytest.fixture(scope="session")
def run_multidevice():
    """`run(code, *, num_devices=8, timeout=600.0) -> result` (see the module docstring)."""
    return run_python_with_devices


def load_config(path: str, variant: str | None = None):
    """`get_config(variant)` of a config file, loaded the way `--config=path:variant` loads it."""
    spec = importlib.util.spec_from_file_location("jaxdpdm_test_config", REPO_ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


@pytest.fixture(scope="session")
def tiny_config():
    """A factory of fresh quickstart ":tiny" configs (3 DP steps on 8x8 digits, seed 0)."""
    return lambda: load_config("configs/quickstart.py", "tiny")


def save_fake_checkpoint(workdir, config, *, step: int, num_classes: int = 10,
                         fill: float = 0.5) -> None:
    """Writes checkpoint `step` of `config`'s model into `workdir` without compiling anything:
    every parameter is `fill`, and the meta records `config` like a training run's."""
    import jax
    import numpy as np

    from jaxdpdm.checkpoint import CHECKPOINT_SUBDIR, CheckpointStore
    from jaxdpdm.experiment import build_experiment

    shapes = jax.eval_shape(build_experiment(config, num_classes=num_classes).init_params)
    params = jax.tree.map(lambda s: np.full(s.shape, fill, s.dtype), shapes)
    store = CheckpointStore(os.path.join(workdir, CHECKPOINT_SUBDIR))
    state = {"step": np.asarray(step, np.int32), "params": params, "ema_params": params}
    store.save(step, state,
               {"num_classes": num_classes, "phase": config.phase, "config": config.to_json()})
    store.close()


@pytest.fixture(scope="session")
def fake_checkpoint():
    """`save(workdir, config, *, step, num_classes=10, fill=0.5)`: see `save_fake_checkpoint`."""
    return save_fake_checkpoint
