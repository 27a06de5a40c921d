"""Shared by the tests of launch/: the launcher modules, a config, and small fakes.

No cloud and no cluster is needed: `gcloud`, `git`, `srun`, `scontrol`, `sbatch` and the remote
`python3` are replaced by small fakes on PATH (`fake_program`) that record their arguments, and the
generated shell (the TPU workers' scripts, the sbatch script) is run for real by bash.
"""

from __future__ import annotations

import pathlib
import shlex
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
sys.path.insert(0, str(LAUNCH))
import common  # noqa: E402

assert pathlib.Path(common.__file__).parent == LAUNCH, "another module named `common` was imported"

_CONFIGS = sorted((REPO / "configs").glob("*.py"))
CONFIG = ("configs/default.py" if (REPO / "configs/default.py").is_file() else
          _CONFIGS[0].relative_to(REPO).as_posix() if _CONFIGS else None)
NEEDS_CONFIG = pytest.mark.skipif(CONFIG is None, reason="no config file in configs/")

# A value with spaces, both quote kinds and shell metacharacters: it must reach jaxdpdm.main intact.
TRICKY = """--config.data.name=it's a "b" $HOME `x`; c"""


def launcher(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LAUNCH / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def commands_of(dry_run_stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in dry_run_stdout.splitlines() if not line.startswith("#")]


def remote_script(argv: list[str]) -> str:
    (command,) = [a for a in argv if a.startswith("--command=")]
    return command[len("--command="):]


def fake_program(path: pathlib.Path, body: str) -> None:
    """Writes an executable Python script (the fakes of gcloud, git, srun, ...)."""
    path.write_text(f"#!{sys.executable}\nimport json, os, sys, time\n" + textwrap.dedent(body))
    path.chmod(0o755)
