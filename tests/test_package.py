"""Tests of jaxdpdm/__init__.py (the default XLA flags and how the user overrides them) and of the
package's import graph."""

import ast
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import jaxdpdm
from jaxdpdm import DEFAULT_XLA_FLAGS, xla_flags_with_defaults

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_user_flags_win_and_defaults_fill_in():
    assert xla_flags_with_defaults("", ("--a=1", "--b")) == "--a=1 --b"
    assert xla_flags_with_defaults("--a=2  --c=3", ("--a=1", "--b")) == "--a=2 --c=3 --b"
    # Idempotent: importing twice (or in a child process) does not repeat a flag.
    once = xla_flags_with_defaults("--c=3")
    assert xla_flags_with_defaults(once) == once
    assert all(flag.startswith("--xla_cpu_") for flag in DEFAULT_XLA_FLAGS)  # CPU-only flags
    assert jaxdpdm.__version__


def _xla_flags_after(code: str, **env) -> list[str]:
    """XLA_FLAGS and XLA_DEFAULTS_APPLIED as a fresh interpreter sees them after `code`."""
    script = textwrap.dedent(code) + textwrap.dedent("""
        import os, jaxdpdm
        print(jaxdpdm.XLA_DEFAULTS_APPLIED)
        print(os.environ.get("XLA_FLAGS", ""))
    """)
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXDPDM_XLA_DEFAULTS")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=300, check=True)
    return proc.stdout.splitlines()[-2:]


def test_flags_set_before_jax_runs_and_left_alone_after():
    defaults = " ".join(DEFAULT_XLA_FLAGS)
    # jax imported first is fine: XLA reads its flags when the first backend is created.
    assert _xla_flags_after("import jax") == ["True", defaults]
    assert _xla_flags_after("", XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=dot") == [
        "True", "--xla_cpu_experimental_ynn_fusion_type=dot"
    ]
    assert _xla_flags_after("", JAXDPDM_XLA_DEFAULTS="0") == ["False", ""]
    # Too late once a backend exists: nothing is changed (the process keeps XLA's defaults).
    assert _xla_flags_after("import jax; jax.numpy.ones(1).block_until_ready()") == ["False", ""]


def test_flags_left_out_on_jaxlib_releases_they_were_not_measured_on():
    # XLA aborts on a flag it does not know, so an untested jaxlib gets XLA's defaults.
    fake_version = """
        from importlib import metadata
        real = metadata.version
        metadata.version = lambda name: "99.0.0" if name == "jaxlib" else real(name)
    """
    assert _xla_flags_after(fake_version) == ["False", ""]


def _import_graph() -> dict[str, set[str]]:
    """jaxdpdm module -> the jaxdpdm modules it imports anywhere in its text (top level, inside
    functions, under TYPE_CHECKING): a lazy import hides a cycle from Python, not from readers."""
    package = pathlib.Path(REPO_ROOT) / "jaxdpdm"
    files = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets.update(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in
                               files else node.module for alias in node.names)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def _modules_on_cycles(graph: dict[str, set[str]]) -> set[str]:
    """The modules from which an import chain leads back to themselves."""

    def reachable(start):
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
        return seen

    return {module for module in graph if module in reachable(module)}


def test_import_graph_finds_a_cycle():
    assert _modules_on_cycles({"a": {"b"}, "b": {"a", "c"}, "c": set()}) == {"a", "b"}


@pytest.mark.parametrize("prefix", [
    "jaxdpdm.config", "jaxdpdm.experiment", "jaxdpdm.data", "jaxdpdm.dp", "jaxdpdm.models",
    "jaxdpdm.evaluation"
])
def test_no_import_cycle_through(prefix):
    on_cycles = _modules_on_cycles(_import_graph())
    assert not {m for m in on_cycles if m == prefix or m.startswith(prefix + ".")}, on_cycles
