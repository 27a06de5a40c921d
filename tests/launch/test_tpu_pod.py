"""Tests for launch/tpu_pod.py: the plan, the dry run, a real run against a fake gcloud, and the
workers' generated shell run by bash (install, start, keep-alive, logs, stop).
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
import tarfile
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from launch_harness import (CONFIG, NEEDS_CONFIG, TRICKY, commands_of,  # noqa: E402
                            common, fake_program, launcher, remote_script)
import tpu_pod  # noqa: E402

pytestmark = NEEDS_CONFIG

TPU_ARGS = [
    "--name=dpdm", "--zone=us-central2-b", "--project=my-proj", "--accelerator-type=v4-32",
    f"--config={CONFIG}", "--workdir=gs://bucket/run"
]
HAS_POSIX_PROCS = sys.platform.startswith("linux") and all(
    shutil.which(tool) for tool in ("bash", "setsid", "tar"))


def is_alive(pid: int) -> bool:
    """Running and not a zombie (a zombie's cmdline is empty; PID 1 may never reap it)."""
    try:
        return bool(pathlib.Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


def tpu_job(**changes) -> tpu_pod.TpuJob:
    fields = dict(name="dpdm", zone="us-central2-b", project="my-proj", accelerator_type="v4-32",
                  runtime_version="tpu-ubuntu2204-base", config=CONFIG, workdir="gs://bucket/run",
                  overrides=("--config.train.num_steps=7", TRICKY))
    return tpu_pod.TpuJob(**{**fields, **changes})


def test_tpu_dry_run_checks_creates_ships_installs_starts_in_order():
    result = launcher("tpu_pod.py", *TPU_ARGS, "--dry-run", "--", TRICKY)
    assert result.returncode == 0, result.stderr
    commands = commands_of(result.stdout)
    steps = [c[3:5] if c[0] == "gcloud" else c[3:4] for c in commands]
    assert steps == [["tpu-vm", "describe"], ["tpu-vm", "create"], ["archive"], ["tpu-vm", "scp"],
                     ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]
    for argv in commands:
        if argv[0] == "gcloud":
            assert "--zone=us-central2-b" in argv and "--project=my-proj" in argv
    assert {"--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"} <= set(commands[1])
    assert all("--worker=all" in argv for argv in commands[3:])
    start = remote_script(commands[-1])
    main = common.main_command("python3", config=CONFIG, workdir="gs://bucket/run", multihost=True,
                               overrides=[TRICKY])
    assert f'"$HOME/jaxdpdm-venv/bin/python" {shlex.join(main[1:])} >>' in start
    assert "--multihost" in main
    assert "setsid nohup" in start and "jaxdpdm-run/train.log" in start
    # The dry run prints exactly the plan the launcher executes.
    job = tpu_job(overrides=(TRICKY,), archive=commands[2][-2].split("=", 1)[1])
    assert commands[1:] == [list(c) for p in tpu_pod.launch_plan(job, "absent") for c in p.commands]


def test_tpu_reuse_skips_creation_but_still_ships_and_starts(capsys):
    assert tpu_pod.main([*TPU_ARGS, "--reuse", "--dry-run"]) == 0
    commands = commands_of(capsys.readouterr().out)
    assert commands[0][4] == "describe"
    assert not any("create" in argv for argv in commands)
    assert [c[4] for c in commands if c[0] == "gcloud"][-3:] == ["scp", "ssh", "ssh"]


def test_tpu_queued_spot_creates_a_queued_resource_and_waits_for_it(capsys):
    assert tpu_pod.main(
        [*TPU_ARGS, "--queued", "--spot", "--accelerator-type=v5litepod-16", "--dry-run"]) == 0
    out = capsys.readouterr().out
    commands = commands_of(out)
    create = commands[1]
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert {
        "--node-id=dpdm", "--accelerator-type=v5litepod-16",
        "--runtime-version=v2-alpha-tpuv5-lite", "--spot"
    } <= set(create)
    assert commands[2][4] == "describe" and "--format=value(state.state)" in commands[2]
    assert "re-run until it prints ACTIVE" in out
    assert commands[4][3:5] == ["tpu-vm", "scp"]  # nodes are reached by their id, the same name


@pytest.mark.parametrize("condition, expected", [("absent", ["create"]), ("ready", []),
                                                 ("pending", ["describe"]),
                                                 ("dead", ["delete", "create"]),
                                                 ("stopped", ["start"])])
def test_tpu_launch_plan_provisions_by_condition(condition, expected):
    phases = tpu_pod.launch_plan(tpu_job(), condition)
    provision = [
        c[4]
        for p in phases
        for c in p.commands
        if c[4] in ("create", "delete", "describe", "start")
    ]
    assert provision == expected
    verbs = [c[3] if c[0] == "git" else c[4] for c in phases[-3].commands + phases[-2].commands]
    assert verbs == ["archive", "scp", "ssh"]
    if condition == "dead":
        assert "--quiet" in phases[0].commands[0]


@pytest.mark.parametrize("state, queued, condition", [("READY", False, "ready"),
                                                      ("PREEMPTED", False, "dead"),
                                                      ("CREATING", False, "pending"),
                                                      ("STOPPED", False, "stopped"),
                                                      ("ACTIVE", True, "ready"),
                                                      ("SUSPENDED", True, "dead"),
                                                      ("WAITING_FOR_RESOURCES", True, "pending"),
                                                      ("DELETING", False, None)])
def test_tpu_classify_state(state, queued, condition):
    if condition is None:
        with pytest.raises(ValueError, match=state):
            tpu_pod.classify_state(state, queued=queued)
    else:
        assert tpu_pod.classify_state(state, queued=queued) == condition


def test_tpu_collect_delete_logs_stop_commands(capsys):
    assert tpu_pod.main([
        "collect", "--workdir=gs://bucket/run/", "--dest=out dir", "--skip-checkpoints", "--dry-run"
    ]) == 0
    assert commands_of(capsys.readouterr().out) == [["mkdir", "-p", "out dir"],
                                                    [
                                                        "gcloud", "storage", "rsync",
                                                        "gs://bucket/run/", "out dir",
                                                        "--recursive", "--exclude=^checkpoints/"
                                                    ]]
    assert tpu_pod.main(["delete", "--name=dpdm", "--zone=z", "--queued", "--yes",
                         "--dry-run"]) == 0
    assert commands_of(capsys.readouterr().out) == [[
        "gcloud", "compute", "tpus", "queued-resources", "delete", "dpdm", "--zone=z", "--force",
        "--quiet"
    ]]
    assert tpu_pod.main(["logs", "--name=dpdm", "--zone=z", "--lines=5", "--dry-run"]) == 0
    (logs,) = commands_of(capsys.readouterr().out)
    assert "--worker=0" in logs and remote_script(logs).startswith("tail -n 5 ")
    assert tpu_pod.main(["stop", "--name=dpdm", "--zone=z", "--dry-run"]) == 0
    (stop,) = commands_of(capsys.readouterr().out)
    assert "--worker=all" in stop and "kill" in remote_script(stop)


@pytest.mark.parametrize("args, message", [
    ([a for a in TPU_ARGS if not a.startswith("--zone")], "needs --zone"),
    ([*TPU_ARGS[:-1], "--workdir=/local/run"], "gs://"),
    ([*TPU_ARGS, "--accelerator-type=v4"], "not like v4-32"),
    ([*TPU_ARGS, "--accelerator-type=v9x-8"], "--runtime-version"),
    ([*TPU_ARGS, "--name=Bad_Name"], "--name"),
    ([*TPU_ARGS, "--config=/etc/hostname"], "outside the repository"),
    ([*TPU_ARGS, "--config=configs/missing.py"], "not found"),
    ([*TPU_ARGS, "--", "--workdir=gs://other/run"], "set by the launcher"),
    ([*TPU_ARGS, "--", "--dry-run"], "put it before '--'"),
    (["collect"], "needs --workdir"),
    (["delete", "--name=dpdm", "--zone=z", "--", "--config.x=1"], "for launch"),
])
def test_tpu_bad_arguments_exit_2_with_a_clear_message(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        tpu_pod.main(["--dry-run", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_tpu_bad_arguments_in_a_subprocess():
    result = launcher("tpu_pod.py", *[a for a in TPU_ARGS if not a.startswith("--zone")])
    assert result.returncode == 2 and "launch needs --zone" in result.stderr


@pytest.fixture()
def fake_cloud(tmp_path, monkeypatch):
    """Fake `gcloud` and `git` on PATH that log their argv to calls.jsonl."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    fake_program(
        bin_dir / "gcloud", """
        open(os.environ["FAKE_LOG"], "a").write(json.dumps(["gcloud", *sys.argv[1:]]) + "\\n")
        if "describe" in sys.argv:
            state = os.environ.get("FAKE_TPU_STATE", "")
            if not state:
                sys.exit(print("ERROR: NOT_FOUND: Resource was not found", file=sys.stderr) or 1)
            print(state)
    """)
    fake_program(
        bin_dir / "git", """
        open(os.environ["FAKE_LOG"], "a").write(json.dumps(["git", *sys.argv[1:]]) + "\\n")
        if "status" in sys.argv:
            print(os.environ.get("FAKE_GIT_STATUS", ""), end="")
        for arg in sys.argv:
            if arg.startswith("--output="):
                open(arg.split("=", 1)[1], "wb").close()
    """)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tpu_pod.tempfile, "tempdir", None)  # re-read TMPDIR
    return lambda: [json.loads(line) for line in log.read_text().splitlines()]


def test_tpu_real_run_executes_the_dry_run_plan(fake_cloud, capsys):
    assert tpu_pod.main([*TPU_ARGS, "--dry-run", "--", TRICKY]) == 0
    planned = commands_of(capsys.readouterr().out)
    assert tpu_pod.main([*TPU_ARGS, "--", TRICKY]) == 0
    executed = [c for c in fake_cloud() if c[0] == "gcloud" or "archive" in c]
    assert executed == planned
    assert any("status" in c for c in fake_cloud())  # the uncommitted-changes check ran


@pytest.mark.parametrize(
    "env, message", [({"FAKE_TPU_STATE": "READY"}, "already exists (state READY); pass --reuse"),
                     ({"FAKE_GIT_STATUS": " M jaxdpdm/train.py\n"}, "uncommitted changes")])
def test_tpu_real_run_refuses_an_existing_tpu_or_a_dirty_tree(fake_cloud, monkeypatch, capsys, env,
                                                              message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert tpu_pod.main(TPU_ARGS) == 1
    assert message in capsys.readouterr().err
    assert not any("create" in c or "ssh" in c for c in fake_cloud())


@pytest.mark.skipif(not HAS_POSIX_PROCS, reason="needs Linux /proc, bash, setsid and tar")
def test_tpu_worker_scripts_install_start_keep_alive_log_and_stop(tmp_path):
    """Runs the install/start/logs/stop scripts with bash as a worker would, with a fake python3."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    (tmp_path / "code").mkdir()
    (tmp_path / "code/requirements-tpu.txt").write_text("jax[tpu]\n")
    with tarfile.open(home / tpu_pod.REMOTE_ARCHIVE, "w:gz") as archive:
        archive.add(tmp_path / "code/requirements-tpu.txt", arcname="requirements-tpu.txt")
    fake_program(
        bin_dir / "python3", """
        home = os.environ["HOME"]
        if sys.argv[1] == "-c":  # the venv's version check
            sys.exit(0)
        if sys.argv[1:3] in (["-m", "pip"], ["-m", "uv"]):
            open(os.path.join(home, "pip.log"), "a").write(json.dumps(sys.argv[1:]) + "\\n")
            if sys.argv[3] == "venv":  # the venv's python is this fake too
                os.makedirs(os.path.join(sys.argv[-1], "bin"))
                os.symlink(sys.argv[0], os.path.join(sys.argv[-1], "bin", "python"))
            sys.exit(0)
        record = {"argv": sys.argv[1:], "cwd": os.getcwd(), "pid": os.getpid(),
                  "unbuffered": os.environ.get("PYTHONUNBUFFERED")}
        json.dump(record, open(os.path.join(home, "main.tmp"), "w"))
        os.replace(os.path.join(home, "main.tmp"), os.path.join(home, "main.json"))
        print("step 1 of training")
        time.sleep(60)
    """)
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    job = tpu_job()

    def on_worker(argv):
        result = subprocess.run(["bash", "-c", remote_script(argv)], env=env, capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout

    record = None
    try:
        on_worker(tpu_pod.install_command(job))
        assert (home / "jaxdpdm/requirements-tpu.txt").is_file()
        installs = [json.loads(line) for line in (home / "pip.log").read_text().splitlines()]
        assert [i[:4] for i in installs] == [["-m", "pip", "install", "-q"],
                                             ["-m", "uv", "venv", "-q"],
                                             ["-m", "uv", "pip", "install"],
                                             ["-m", "uv", "pip", "install"]]
        assert installs[1][-3:] == ["--python", "3.12", str(home / "jaxdpdm-venv")]
        assert installs[2][-2:] == ["-r", "requirements-tpu.txt"]
        assert "started pid" in on_worker(tpu_pod.start_command(job))
        for _ in range(200):
            if (home / "main.json").exists():
                break
            time.sleep(0.05)
        record = json.loads((home / "main.json").read_text())
        assert record["argv"] == common.main_command("python3", config=CONFIG,
                                                     workdir="gs://bucket/run", multihost=True,
                                                     overrides=job.overrides)[1:]
        assert os.path.realpath(record["cwd"]) == os.path.realpath(home / "jaxdpdm")
        assert record["unbuffered"] == "1"
        assert (home / "jaxdpdm-run/run.pid").read_text().strip() == str(record["pid"])
        # Re-running the launcher while the run is alive leaves it (and its code) alone.
        assert "already running" in on_worker(tpu_pod.start_command(job))
        assert "code left as it is" in on_worker(tpu_pod.install_command(job))
        assert json.loads((home / "main.json").read_text())["pid"] == record["pid"]
        assert "step 1 of training" in on_worker(tpu_pod.logs_command(job, worker="0", lines=5))
        assert "stopped pid" in on_worker(tpu_pod.stop_command(job))
        assert not (home / "jaxdpdm-run/run.pid").exists()
        assert not is_alive(record["pid"])
    finally:
        if record is not None:
            try:
                os.kill(record["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
