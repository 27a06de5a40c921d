"""One command, two phases: public pretraining, then DP fine-tuning from it, resumable."""

import json
import os

import pytest

from jaxdpdm import phases
from jaxdpdm.config import validate_config
from jaxdpdm.train import train


def _two_phase(tiny_config, **overrides):
    config = tiny_config()
    config.data.public_fraction, config.data.subset = 0.2, "private"
    config.pretrain.num_steps = 2
    config.pretrain.batch_size = 16
    config.train.num_steps = 2
    for dotted, value in overrides.items():
        section, field = dotted.split(".")
        config[section][field] = value
    return config


def test_pretraining_config_is_the_public_non_private_run(tiny_config):
    config = _two_phase(tiny_config, **{"pretrain.augmult": 1, "pretrain.learning_rate": 5e-3})
    pre = phases.pretraining_config(config)
    validate_config(pre)
    assert (pre.phase, pre.data.subset, pre.init_from) == ("pretrain", "public", None)
    assert (pre.train.num_steps, pre.train.batch_size, pre.train.learning_rate) == (2, 16, 5e-3)
    assert pre.diffusion.augmult == 1 and pre.pretrain.num_steps == 0
    assert tuple(pre.diffusion.timestep_ranges) == ((0, config.diffusion.num_timesteps),)
    # Everything that defines the model and the split is shared with the DP phase.
    assert pre.model == config.model and pre.data.split_seed == config.data.split_seed
    assert pre.data.public_fraction == config.data.public_fraction
    fine = phases.fine_tuning_config(config, "W/pretrain")
    assert (fine.init_from, fine.phase, fine.pretrain.num_steps) == ("W/pretrain", "dp", 0)
    assert config.init_from is None  # the caller's config is not changed


@pytest.mark.parametrize("overrides, message", [
    ({"data.subset": "all", "data.public_fraction": 0.0}, "needs phase 'dp' and data.subset"),
    ({"init_from": "/somewhere"}, "leave init_from unset"),
    ({"pretrain.learning_rate": 0.0}, "pretrain needs"),
])
def test_invalid_two_phase_configs_are_refused(tiny_config, overrides, message):
    config = _two_phase(tiny_config)
    for dotted, value in overrides.items():
        if "." in dotted:
            section, field = dotted.split(".")
            config[section][field] = value
        else:
            config[dotted] = value
    with pytest.raises(ValueError, match=message):
        validate_config(config)


@pytest.mark.slow
def test_one_call_trains_both_phases_reports_both_and_resumes(tmp_path, tiny_config):
    config = _two_phase(tiny_config, **{"eval.label_consistency_samples": 20})
    workdir = str(tmp_path / "run")
    result = train(config, workdir)
    assert result["step"] == 2
    pre_dir = os.path.join(workdir, phases.PRETRAIN_SUBDIR)
    assert phases.pretraining_done(pre_dir, 2)
    for name in ("grid_final.png", "label_consistency.json"):
        assert os.path.getsize(os.path.join(pre_dir, name)) > 0
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    assert not os.path.exists(os.path.join(pre_dir, "privacy_report.json"))

    report = json.load(open(os.path.join(workdir, "privacy_report.json")))
    assert report["training"]["init_from"] == pre_dir
    # digits train split: 1,442 images, 20% public (288) and 1,154 private.
    assert report["mechanism"]["num_examples"] == 1154
    assert report["protected"].startswith("each of the 1154 training examples")
    assert "private part" in report["protected"]
    assert "288 images" in report["not_protected"] and "without privacy" in report["not_protected"]
    assert "public part" in report["not_protected"]
    text = open(os.path.join(workdir, "privacy_report.txt")).read()
    assert "Not protected by this guarantee: the 288 images" in text

    consistency = json.load(open(os.path.join(workdir, "label_consistency.json")))
    assert consistency["num_samples"] == 20 and consistency["num_per_class"] == [2] * 10
    assert consistency["classifier_real_test_accuracy"] > 0.9
    assert 0.0 <= consistency["overall"] <= 1.0

    # Running the command again resumes phase 2 (here: finished); phase 1 is not repeated.
    pre_mtime = os.path.getmtime(os.path.join(pre_dir, "grid_final.png"))
    assert train(config, workdir)["step"] == 2
    assert os.path.getmtime(os.path.join(pre_dir, "grid_final.png")) == pre_mtime
