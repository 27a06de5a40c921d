"""Tests for launch/gpu_node.py: the dry run, the memory choices, bad arguments, and a real run of a
fake interpreter whose output is appended to the workdir's log.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from launch_harness import (CONFIG, NEEDS_CONFIG, REPO, TRICKY, common, fake_program,  # noqa: E402
                            launcher)
import gpu_node  # noqa: E402

pytestmark = NEEDS_CONFIG


def test_gpu_node_dry_run_sets_gpus_memory_and_tees_into_the_workdir(tmp_path):
    result = launcher("gpu_node.py", f"--config={CONFIG}", f"--workdir={tmp_path}/run",
                      "--gpus=0,1,2,3", "--dry-run", "--", TRICKY)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert shlex.split(lines[0]) == ["mkdir", "-p", f"{tmp_path}/run/logs"]
    command, tee = lines[1].split(" 2>&1 | ")
    argv = shlex.split(command)
    assert argv[:4] == [
        "env", "CUDA_VISIBLE_DEVICES=0,1,2,3", "PYTHONUNBUFFERED=1",
        "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"
    ]
    assert argv[4:] == common.main_command(argv[4], config=CONFIG, workdir=f"{tmp_path}/run",
                                           overrides=[TRICKY])
    assert "--multihost" not in argv
    assert shlex.split(tee) == ["tee", "-a", f"{tmp_path}/run/logs/gpu_node.log"]
    assert os.path.isfile(argv[4])  # the interpreter


def test_gpu_node_memory_choices():
    assert gpu_node.gpu_env(gpus=None, mem_fraction=0.5, preallocate=True) == {
        "PYTHONUNBUFFERED": "1", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"
    }
    assert gpu_node.gpu_env(gpus="1", mem_fraction=0.9, preallocate=False) == {
        "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "1",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false"
    }


@pytest.mark.parametrize("args, message",
                         [(["--gpus=0,a"], "GPU indices"), (["--gpus=0,0"], "twice"),
                          (["--mem-fraction=1.5"], "(0, 1]"),
                          (["--workdir=gs://b/r"], "filesystem"),
                          (["--", "--multihost"], "set by the launcher"),
                          (["--mem-fraction=0.5", "--no-preallocate"], "not allowed with")])
def test_gpu_node_bad_arguments_exit_2(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        gpu_node.main([f"--config={CONFIG}", "--workdir=w", "--dry-run", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_gpu_node_runs_the_command_and_appends_its_output_to_the_log(tmp_path, capsys):
    python = tmp_path / "python"
    fake_program(
        python, """
        keys = ("CUDA_VISIBLE_DEVICES", "XLA_PYTHON_CLIENT_PREALLOCATE", "PYTHONUNBUFFERED")
        print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),
                          "env": {k: os.environ.get(k) for k in keys}}))
        print("oops", file=sys.stderr)
        sys.exit(3)
    """)
    workdir = tmp_path / "run"
    args = [
        f"--config={CONFIG}", f"--workdir={workdir}", "--gpus=2,3", "--no-preallocate",
        f"--python={python}", "--mode=sample", "--", TRICKY
    ]
    for attempt in (1, 2):
        assert gpu_node.main(args) == 3
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert record["argv"] == common.main_command("x", config=CONFIG, workdir=str(workdir),
                                                 mode="sample", overrides=[TRICKY])[1:]
    assert record["cwd"] == str(REPO)
    assert record["env"] == {
        "CUDA_VISIBLE_DEVICES": "2,3", "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "PYTHONUNBUFFERED": "1"
    }
    log = (workdir / "logs/gpu_node.log").read_text()
    assert log.count("oops") == 2 and log.count("=== exit status 3") == 2  # appended, not replaced
