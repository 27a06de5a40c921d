"""benchmarks/fmnist_gpu.sh --smoke: the GPU recipe's whole chain (two-phase training, sampling,
evaluation with label consistency) runs on the CPU with the `:smoke` config, and leaves what it
promises. Needs the Fashion-MNIST files (Debian's dataset-fashion-mnist); skipped without them.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from jaxdpdm.data import idx

REPO = pathlib.Path(__file__).resolve().parent.parent


def _have_fashion_mnist() -> bool:
    try:
        idx.load_idx_split(idx.IDX_DATASETS["fashion_mnist"], "test")
    except (FileNotFoundError, ValueError):
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _have_fashion_mnist(), reason="Fashion-MNIST files not installed")
def test_fmnist_gpu_smoke_runs_the_whole_chain(tmp_path):
    workdir, out = tmp_path / "run", tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "fmnist_gpu.sh"), "--smoke"], cwd=REPO,
        capture_output=True, text=True, timeout=1200,
        env={**os.environ, "WORKDIR": str(workdir), "OUT": str(out), "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for mode in ("train", "sample", "evaluate"):
        assert f"fmnist_gpu: {mode} took" in proc.stdout
    privacy = json.loads((out / "privacy_report.json").read_text())
    assert privacy["mechanism"]["steps"] == 2
    assert "6000 images" not in privacy["protected"] and "private part" in privacy["protected"]
    assert "public part" in privacy["not_protected"]
    report = json.loads((out / "eval_report.json").read_text())
    assert report["samples"]["num"] == 40
    assert report["label_consistency"]["classifier"] == "cnn"
    assert report["label_consistency"]["num_per_class"] == [4] * 10
    for name in ("grid_final.png", "pretrain_grid_final.png", "samples_grid.png",
                 "eval_summary.txt", "timings.txt"):
        assert (out / name).stat().st_size > 0, name
