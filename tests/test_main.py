"""The command line, end to end: train, sample and evaluate on the embedded digits."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "jaxdpdm.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


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
                   f"--config.sample.image_folder={workdir}/png")
    assert sample.returncode == 0, sample.stderr[-3000:]
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
    assert "Downstream accuracy" in open(os.path.join(workdir, "eval", "summary.txt")).read()


@pytest.mark.parametrize("args, message", [
    (["--config.dp.delta=2.0"], "dp.delta must be in (0, 1)"),
    (["--mode=sample"], "no checkpoint"),
])
def test_user_errors_are_one_line(tmp_path, args, message):
    result = _main("--config=configs/quickstart.py:tiny", f"--workdir={tmp_path}", *args)
    assert result.returncode == 2
    assert "error:" in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_quoted_tilde_workdir_means_the_home_folder(tmp_path):
    # `--workdir="~/x"` reaches the program unexpanded; it must not create a folder named "~".
    result = subprocess.run(
        [sys.executable, "-m", "jaxdpdm.main", f"--config={REPO}/configs/quickstart.py:tiny",
         "--workdir=~/run", "--mode=sample"], cwd=tmp_path, capture_output=True, text=True,
        timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu", "HOME": str(tmp_path / "home"),
                          "PYTHONPATH": REPO})
    assert result.returncode == 2
    assert f"no checkpoint in {tmp_path / 'home' / 'run'}" in result.stderr
    assert not (tmp_path / "~").exists()
