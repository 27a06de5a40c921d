"""End-to-end audits on the quickstart ":tiny" model: the real mechanism passes, a broken one is
caught, and the audit never writes into the release workdir.

Setting (shared by the runs, so the compiled programs are too): 16 real digits and 1,000
white-box canaries, q = 0.5, 10 steps, claimed epsilon 1. An ideal attacker simulated with these
numbers reaches a lower bound of about 0.3 with the calibrated sigma and about 3 with sigma / 10.
"""

import hashlib
import os
import subprocess
import sys

import pytest

from jaxdpdm import plans as plans_module
from jaxdpdm.audit import run as audit_run
from jaxdpdm.audit.run import AUDIT_SUBDIR, run_audit
from jaxdpdm.config import validate_config
from jaxdpdm.dp import dp_aggregate

CLAIMED_EPSILON = 1.0


@pytest.fixture(autouse=True)
def _fixed_audit_secret(monkeypatch):
    # Real audits draw the canaries' secret from the OS; tests fix it to be reproducible.
    monkeypatch.setattr(audit_run, "_secret_seed", lambda: 1234)


def _audit_config(tiny_config):
    config = tiny_config()
    config.data.max_examples = 16
    config.audit.kind = "gradient"
    config.audit.num_canaries = 1000
    config.train.num_steps = 10
    config.train.batch_size = 508  # q = 508 / (16 + 1000) = 0.5
    config.train.checkpoint_every = 10
    config.train.log_every = 10
    config.dp.target_epsilon = CLAIMED_EPSILON
    return config


def _tree_digest(root):
    digest = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                digest[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return digest


@pytest.mark.slow
def test_real_mechanism_is_consistent_and_release_workdir_untouched(tiny_config, tmp_path):
    release = tmp_path / "release"
    (release / "checkpoints" / "3").mkdir(parents=True)
    (release / "checkpoints" / "3" / "state").write_bytes(b"released model")
    (release / "privacy_report.json").write_text("{}")
    before = _tree_digest(release)

    report = run_audit(_audit_config(tiny_config), str(release))

    after = _tree_digest(release)
    assert {k: v for k, v in after.items() if not k.startswith(AUDIT_SUBDIR + os.sep)} == before
    assert "audit_report.json" in os.listdir(release / AUDIT_SUBDIR)
    assert report["claim"]["epsilon"] == pytest.approx(CLAIMED_EPSILON, rel=1e-3)
    bounds = report["canaries"]["gradient"]
    assert bounds["num_canaries"] == 1000
    print("real mechanism:", report["canaries"])
    assert bounds["epsilon_lower_bound"] <= CLAIMED_EPSILON
    assert report["verdict"].startswith("consistent")


@pytest.mark.slow
def test_noise_divided_by_ten_is_caught_by_the_white_box_audit(tiny_config, tmp_path, monkeypatch):
    # The bug: the optimizer adds a tenth of the noise that the accountant accounts for.
    def broken(**kwargs):
        return dp_aggregate(**{**kwargs, "noise_multiplier": kwargs["noise_multiplier"] / 10})

    monkeypatch.setattr(plans_module, "dp_aggregate", broken)
    report = run_audit(_audit_config(tiny_config), str(tmp_path))
    bounds = report["canaries"]["gradient"]
    print("noise / 10:", report["canaries"])
    assert bounds["epsilon_lower_bound"] > CLAIMED_EPSILON
    assert report["verdict"].startswith("VIOLATION")


def test_audit_config_fields_are_validated(tiny_config):
    for field, value in (("kind", "weights"), ("num_canaries", 1), ("confidence", 1.0),
                         ("score_timesteps", 0)):
        config = tiny_config()
        config.audit[field] = value
        with pytest.raises(ValueError, match=f"audit.{field}"):
            validate_config(config)


def test_audit_of_a_pretraining_config_is_a_one_line_error(tmp_path):
    proc = subprocess.run([
        sys.executable, "-m", "jaxdpdm.main", "--config=configs/fashion_mnist_pretrain.py:smoke",
        f"--workdir={tmp_path}", "--mode=audit"
    ], capture_output=True, text=True, cwd=os.path.dirname(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --mode=audit audits a DP run")
