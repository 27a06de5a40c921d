"""Tests for launch/slurm.py: the sbatch script, time limits, bad arguments, submission through a
fake sbatch, and the generated script run by bash with fake srun/scontrol (requeue on USR1).
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from launch_harness import (CONFIG, NEEDS_CONFIG, TRICKY, common, fake_program,  # noqa: E402
                            launcher)
import slurm  # noqa: E402

pytestmark = NEEDS_CONFIG


SLURM_ARGS = [
    "--nodes=4", "--gpus-per-node=8", "--partition=gpu", "--time=1-00:00:00", f"--config={CONFIG}",
    "--workdir=/shared/runs/cifar", "--account=proj", "--python=/shared/venv/bin/python"
]


def test_slurm_dry_run_prints_the_sbatch_script():
    result = launcher("slurm.py", *SLURM_ARGS, "--dry-run", "--", TRICKY)
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert script.startswith("#!/bin/bash\n")
    directives = [
        line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")
    ]
    assert set(directives) >= {
        "--job-name=jaxdpdm-cifar", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
        "--partition=gpu", "--time=1-00:00:00", "--account=proj", "--requeue",
        "--signal=B:USR1@120", "--output=/shared/runs/cifar/slurm/%x-%j.out", "--open-mode=append",
        "--dependency=singleton"
    }
    (srun_line,) = [line for line in script.splitlines() if line.startswith("srun ")]
    assert srun_line.endswith(" &")
    assert shlex.split(srun_line[:-2]) == [
        "srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
        *common.main_command("/shared/venv/bin/python", config=CONFIG, workdir="/shared/runs/cifar",
                             multihost=True, overrides=[TRICKY])
    ]
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in script
    assert "trap requeue_before_time_limit USR1" in script
    assert "sbatch /shared/runs/cifar/slurm/jaxdpdm-cifar.sbatch" in result.stderr
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_slurm_gres_directive_for_older_clusters():
    job = slurm.SlurmJob(config=CONFIG, workdir="/w", nodes=2, gpus_per_node=4, time="60",
                         job_name="t", python="python", use_gres=True)
    script = slurm.sbatch_script(job)
    assert "#SBATCH --gres=gpu:4\n" in script and "--gpus-per-node" not in script


@pytest.mark.parametrize("text, seconds", [("30", 1800), ("30:15", 1815), ("2:00:00", 7200),
                                           ("1-12", 129600), ("1-0:30", 88200),
                                           ("2-01:02:03", 176523), ("UNLIMITED", None)])
def test_slurm_time_limits(text, seconds):
    assert slurm.time_limit_seconds(text) == seconds


@pytest.mark.parametrize("args, message", [(["--time=soon"], "not a SLURM time limit"),
                                           (["--time=1"], "shorter than --time"),
                                           (["--nodes=0"], "at least 1"),
                                           (["--workdir=gs://b/r"], "filesystem"),
                                           (["--sbatch-arg=exclusive"], "sbatch option"),
                                           (["--", "--mode=sample"], "set by the launcher")])
def test_slurm_bad_arguments_exit_2(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        slurm.main([*SLURM_ARGS, "--dry-run", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_slurm_writes_and_submits(tmp_path, monkeypatch, capsys):
    fake_program(
        tmp_path / "sbatch", """
        open(os.environ["FAKE_LOG"], "a").write(json.dumps(sys.argv[1:]) + "\\n")
        print("Submitted batch job 42")
    """)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "sbatch.jsonl"))
    args = [a for a in SLURM_ARGS if not a.startswith("--workdir")] + [f"--workdir={tmp_path}/r"]
    assert slurm.main([*args, "--no-submit"]) == 0
    script_path = tmp_path / "r/slurm/jaxdpdm-r.sbatch"
    assert script_path.read_text().startswith("#!/bin/bash")
    assert not (tmp_path / "sbatch.jsonl").exists()
    assert slurm.main(args) == 0
    assert json.loads((tmp_path / "sbatch.jsonl").read_text()) == [str(script_path)]


@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
@pytest.mark.parametrize("restarts, requeued", [(0, True), (20, False)])
def test_slurm_script_runs_srun_and_requeues_on_usr1(tmp_path, restarts, requeued):
    """Runs the generated script with fake srun/scontrol; USR1 (the time-limit warning) requeues."""
    fake_program(
        tmp_path / "srun", """
        record = {"argv": sys.argv[1:], "pid": os.getpid(),
                  "local_ids": os.environ.get("JAX_LOCAL_DEVICE_IDS")}
        json.dump(record, open(os.environ["FAKE_DIR"] + "/srun.tmp", "w"))
        os.replace(os.environ["FAKE_DIR"] + "/srun.tmp", os.environ["FAKE_DIR"] + "/srun.json")
        time.sleep(30)
    """)
    fake_program(
        tmp_path / "scontrol", """
        open(os.environ["FAKE_DIR"] + "/scontrol.json", "w").write(json.dumps(sys.argv[1:]))
    """)
    job = slurm.SlurmJob(config=CONFIG, workdir=str(tmp_path / "run"), nodes=2, gpus_per_node=4,
                         time="10:00", job_name="t", python="/venv/bin/python", overrides=(TRICKY,))
    env = {
        **os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
        "FAKE_DIR": str(tmp_path), "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_RESTART_COUNT": str(restarts)
    }
    batch = subprocess.Popen(["bash", "-c", slurm.sbatch_script(job)], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    record = None
    try:
        for _ in range(200):
            if (tmp_path / "srun.json").exists():
                break
            time.sleep(0.05)
        record = json.loads((tmp_path / "srun.json").read_text())
        assert record["argv"] == slurm.srun_command(job)[1:]
        assert record["local_ids"] == "0,1,2,3"
        batch.send_signal(signal.SIGUSR1)
        assert batch.wait(timeout=20) == 128 + signal.SIGUSR1  # `wait` interrupted by the trap
    finally:
        batch.kill()
        if record is not None:  # the fake srun outlives bash and holds its stdout open
            try:
                os.kill(record["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    output = batch.stdout.read()
    if requeued:
        assert json.loads((tmp_path / "scontrol.json").read_text()) == ["requeue", "1234"]
        assert "requeueing job 1234" in output
    else:
        assert not (tmp_path / "scontrol.json").exists()
        assert "already requeued 20 times" in output
