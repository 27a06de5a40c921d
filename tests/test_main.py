"""The command line, end to end: train, sample and evaluate on the embedded digits."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxdpdm.checkpoint import CheckpointStore
from jaxdpdm.workdir_lock import LOCK_NAME

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "jaxdpdm.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow
def test_train_sample_evaluate(tmp_path):
    workdir = str(tmp_path / "run")
    config = "--config=configs/quickstart.py:tiny"
    train = _main(config, f"--workdir={workdir}", "--config.train.num_steps=2")
    assert train.returncode == 0, train.stderr[-3000:]
    assert "[step 2/2]" in train.stdout
    report = json.load(open(os.path.join(workdir, "privacy_report.json")))
    assert 0 < report["guarantee"]["epsilon_pld"] <= 10.0
    assert report["mechanism"]["steps"] == 2
    for name in ("grid_final.png", "privacy_report.txt"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]

    sample = _main(config, f"--workdir={workdir}", "--mode=sample",
                   "--config.sample.num_samples=30", "--config.sample.batch_size=20",
                   f"--config.sample.image_folder={workdir}/png",
                   f"--config.sample.npz_file={workdir}/synthetic.npz")
    assert sample.returncode == 0, sample.stderr[-3000:]
    with np.load(os.path.join(workdir, "synthetic.npz"), allow_pickle=False) as published:
        assert published["images"].shape[0] == 30
        provenance = json.loads(str(published["provenance"]))
    assert provenance["checkpoint_step"] == 2
    assert provenance["privacy_guarantee"] == report["guarantee"]
    chunks = sorted(os.listdir(os.path.join(workdir, "samples")))
    assert chunks == ["chunk_00000.npz", "chunk_00001.npz", "meta.json"]
    classes = sorted(n for n in os.listdir(os.path.join(workdir, "png")) if not n.startswith("."))
    assert classes == [str(k) for k in range(10)]
    assert sum(len(os.listdir(os.path.join(workdir, "png", k))) for k in classes) == 30

    evaluate = _main(config, f"--workdir={workdir}", "--mode=evaluate",
                     "--config.eval.classifier_epochs=1")
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    result = json.load(open(os.path.join(workdir, "eval", "report.json")))
    assert result["samples"]["num"] == 30
    assert result["fid"] is None  # no Inception weights configured
    assert 0.0 <= result["downstream"]["synthetic_to_real_test_accuracy"] <= 1.0
    assert result["privacy"]["epsilon_pld"] == report["guarantee"]["epsilon_pld"]
    consistency = result["label_consistency"]
    assert consistency["num_samples"] == 30 and consistency["num_per_class"] == [3] * 10
    assert consistency["classifier_real_test_accuracy"] > 0.9
    summary = open(os.path.join(workdir, "eval", "summary.txt")).read()
    assert "Downstream accuracy" in summary and "Label consistency" in summary


@pytest.mark.parametrize("args, message", [
    (["--config.dp.delta=2.0"], "dp.delta must be in (0, 1)"),
    (["--mode=sample"], "no checkpoint"),
])
def test_user_errors_are_one_line(tmp_path, args, message):
    result = _main("--config=configs/quickstart.py:tiny", f"--workdir={tmp_path}", *args)
    assert result.returncode == 2
    assert "error:" in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr


def _wait_for(path, process, timeout=600.0):
    """Waits until the trainer in `process` has reached a pause point (created `path`)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
def test_lock_refuses_a_second_process_and_ctrl_c_mid_save_keeps_the_checkpoint(tmp_path):
    """Two deterministic pause points of one training process (`pause_for_tests` in
    jaxdpdm/interrupts.py): while it holds the lock, a second process is refused; inside the
    save of step 2, Ctrl-C waits for the write, then exits 130 without a traceback."""
    workdir, pauses = tmp_path / "run", tmp_path / "pauses"
    pauses.mkdir()
    args = ["--config=configs/quickstart.py:tiny", f"--workdir={workdir}"]
    env = {
        **os.environ, "JAXDPDM_TEST_PAUSE_AT": "locked,checkpoint_write@2",
        "JAXDPDM_TEST_PAUSE_DIR": str(pauses), "JAX_PLATFORMS": "cpu"
    }
    first = subprocess.Popen([sys.executable, "-m", "jaxdpdm.main", *args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(pauses / "locked.reached", first)
        second = _main(*args)
        assert second.returncode == 2
        assert f"is in use by pid {first.pid} on host" in second.stderr
        assert "Traceback" not in second.stderr
        (pauses / "locked.go").touch()

        _wait_for(pauses / "checkpoint_write.reached", first)
        first.send_signal(signal.SIGINT)
        (pauses / "checkpoint_write.go").touch()
        _, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "interrupted" in stderr
    store = CheckpointStore(str(workdir / "checkpoints"), create=False)
    try:
        assert store.all_steps() == [2]
        assert store.restore_meta(2)["ledger"]["phases"][0]["steps"] == 2
    finally:
        store.close()
    assert not (workdir / LOCK_NAME).exists()


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_none_on_the_command_line_unsets_an_optional_field():
    from absl import flags
    from ml_collections import config_flags

    from jaxdpdm import main  # registers the None-aware parsers

    def parse(*overrides):
        argv = ["prog", "--config=configs/quickstart.py:tiny", *overrides]
        flag_values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
        flag_values(argv)
        config = flag_values.config
        return config, main.unset_fields_that_cannot_be_none(
            config, config_flags.get_override_values(flag_values["config"]))

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        config, bad = parse("--config.seed=None", "--config.dp.noise_multiplier=1.5")
        assert config.seed is None and config.dp.noise_multiplier == 1.5 and bad == []
        _, bad = parse("--config.train.num_steps=None")
        assert bad == ["train.num_steps"]
    finally:
        os.chdir(cwd)


def test_a_quoted_tilde_workdir_means_the_home_folder(tmp_path):
    # `--workdir="~/x"` reaches the program unexpanded; it must not create a folder named "~".
    result = subprocess.run([
        sys.executable, "-m", "jaxdpdm.main", f"--config={REPO}/configs/quickstart.py:tiny",
        "--workdir=~/run", "--mode=sample"
    ], cwd=tmp_path, capture_output=True, text=True, timeout=300, env={
        **os.environ, "JAX_PLATFORMS": "cpu", "HOME": str(tmp_path / "home"), "PYTHONPATH": REPO
    })
    assert result.returncode == 2
    assert f"no checkpoint in {tmp_path / 'home' / 'run'}" in result.stderr
    assert not (tmp_path / "~").exists()


# --- one-line errors: the config file and its overrides (parsed before any jax import) --------


@pytest.mark.parametrize("config, message", [
    (["--config=configs/quickstart.py:tiny", "--config.train.nm_steps=3"
     ], "unknown config field --config.train.nm_steps (did you mean --config.train.num_steps?)"),
    (["--config=configs/quickstart.py:tiny", "--config.nonsense=1"
     ], "unknown config field --config.nonsense"),
    (["--config=configs/missing.py"], "cannot load the config file: [Errno 2] No such file"),
    (["--config=SYNTAX"], "broken.py line 2: '{' was never closed"),
    (["--config=configs/quickstart.py:huge"], "unknown quickstart variant 'huge'"),
])
def test_config_file_and_field_errors_are_one_line(tmp_path, config, message):
    if config == ["--config=SYNTAX"]:
        (tmp_path / "broken.py").write_text("def get_config():\n    return {\n")
        config = [f"--config={tmp_path / 'broken.py'}"]
    result = _main(*config, f"--workdir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# --- one-line errors: full disks and read-only paths ------------------------------------------

# What orbax raised on a real full disk (a 600 KiB tmpfs) while saving checkpoint 2.
_TENSORSTORE_ENOSPC = (
    'RESOURCE_EXHAUSTED: Error writing local file "/mnt/full/run/checkpoints/2.orbax-checkpoint-'
    'tmp/state.orbax-checkpoint-tmp/_sharding": Failed writing: "/mnt/full/run/checkpoints/2.'
    'orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/_sharding.__lock": Failed to write 128710 '
    "bytes to file 12: No space left on device [os_error_code='28']")


@pytest.mark.parametrize("error, expected", [
    (ValueError(_TENSORSTORE_ENOSPC),
     "no space left on device writing checkpoint 2 in /mnt/full/run/checkpoints; free space"),
    (OSError(errno.ENOSPC, "No space left on device", "/w/samples/chunk_00003.npz"),
     "no space left on device writing /w/samples/chunk_00003.npz; free space"),
    (OSError(errno.EROFS, "Read-only file system",
             "/ro/samples"), "read-only file system writing /ro/samples"),
    (OSError(errno.ENOSPC, "No space left on device"), "writing --workdir /w"),
    (ValueError("dp.delta must be in (0, 1)"), None),
    (OSError(errno.EIO, "Input/output error", "/w/x"), None),
])
def test_environment_errors_become_one_line_naming_the_path(error, expected):
    from jaxdpdm import main

    line = main.describe_environment_error(error, "/w")
    if expected is None:
        assert line is None
    else:
        assert expected in line and "\n" not in line


def test_a_real_full_disk_during_a_checkpoint_save_is_described(tmp_path):
    """Mounts a 256 KiB tmpfs (needs root; skipped elsewhere) and saves 1 MiB into it."""
    from jaxdpdm import main
    from jaxdpdm.checkpoint import CheckpointStore

    mount_point = tmp_path / "full"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs",
                       str(mount_point)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        store = CheckpointStore(str(mount_point / "checkpoints"))
        with pytest.raises((ValueError, OSError)) as error:
            noise = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
            store.save(2, {"w": noise}, {"step": 2})  # incompressible 1 MiB
        line = main.describe_environment_error(error.value, str(mount_point))
        assert line is not None and line.startswith("no space left on device writing")
        assert str(mount_point) in line and "\n" not in line
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_sample_into_a_read_only_workdir_is_one_line(tmp_path, tiny_config, fake_checkpoint):
    """The real command line, with the filesystem's EROFS simulated (root ignores chmod)."""
    workdir = tmp_path / "run"
    fake_checkpoint(str(workdir), tiny_config(), step=3)
    code = f"""
import errno, sys
from etils import epath
def read_only(self, *args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system", str(self))
epath.Path.write_text = epath.Path.write_bytes = read_only
from jaxdpdm.main import run
sys.argv = ["jaxdpdm", "--config=configs/quickstart.py:tiny", "--workdir={workdir}",
            "--mode=sample"]
run()
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not writable" in errors[0] and str(workdir) in errors[0]
    assert "Read-only file system" in errors[0] and "Traceback" not in result.stderr
