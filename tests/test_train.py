"""The training loop: resume determinism, the budget as a hard stop, init_from, early errors.

All runs use the quickstart ":tiny" config (8x8 digits, a 49k-parameter UNet) so the compiled
programs are shared between tests through the persistent compilation cache.
"""

import dataclasses
import errno
import json
import logging
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from jaxdpdm.dp import accounting
from jaxdpdm.experiment import build_experiment, dataset_fingerprint, fingerprint_mismatch
from jaxdpdm.plans import calibrated_noise_multiplier
from jaxdpdm.resume import resumed_noise_multiplier
from jaxdpdm.train import Trainer
from jaxdpdm.workdir_lock import LOCK_NAME


def _tree_equal(a, b) -> bool:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(leaves_a) == len(leaves_b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_config):
    """One uninterrupted 3-step DP run on one device: `(trainer, result, workdir)`."""
    workdir = tmp_path_factory.mktemp("finished")
    trainer = Trainer(tiny_config(), str(workdir))
    return trainer, trainer.run(), workdir


def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path, tiny_config, finished_run):
    full, _, _ = finished_run
    broken = Trainer(tiny_config(), str(tmp_path))
    step_once = broken.train_step

    def step_then_ctrl_c():
        metrics = step_once()
        if broken.step == 2:
            raise KeyboardInterrupt
        return metrics

    broken.train_step = step_then_ctrl_c
    with pytest.raises(KeyboardInterrupt):
        broken.run()
    # The interrupt handler saved the completed steps together with their ledger.
    assert broken.store.latest_step() == 2
    assert broken.store.restore_meta()["ledger"]["phases"][0]["steps"] == 2

    resumed = Trainer(tiny_config(), str(tmp_path))
    assert resumed.step == 2 and resumed.ledger.total_steps == 2
    resumed.run()
    assert _tree_equal(resumed.state["params"], full.state["params"])
    assert _tree_equal(resumed.state["ema_params"], full.state["ema_params"])
    assert _tree_equal(resumed.state["opt_state"], full.state["opt_state"])
    assert resumed.ledger.to_dict() == full.ledger.to_dict()


def test_budget_is_a_hard_stop(tmp_path, tiny_config):
    config = tiny_config()
    config.train.num_steps = 6
    config.dp.noise_multiplier = 1.0
    q = config.train.batch_size / 1442  # digits train split
    # A target that two steps at sigma=1 fit under and three do not.
    two = accounting.epsilon(noise_multiplier=1.0, sampling_rate=q, steps=2, delta=config.dp.delta)
    three = accounting.epsilon(noise_multiplier=1.0, sampling_rate=q, steps=3,
                               delta=config.dp.delta)
    config.dp.target_epsilon = (two + three) / 2
    result = Trainer(config, str(tmp_path)).run()
    assert result["step"] == 2
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert report["training"]["stopped_by_budget"] is True
    assert report["mechanism"]["steps"] == 2
    assert report["guarantee"]["epsilon_pld"] <= config.dp.target_epsilon
    assert (tmp_path / "privacy_report.txt").read_text().startswith("Privacy report")
    assert (tmp_path / "grid_final.png").stat().st_size > 0


def test_calibrated_run_spends_at_most_the_target(tiny_config, finished_run):
    config = tiny_config()
    _, result, workdir = finished_run
    guarantee = result["privacy"]["guarantee"]
    assert result["step"] == config.train.num_steps
    assert guarantee["epsilon_pld"] <= config.dp.target_epsilon
    assert guarantee["epsilon_pld"] > 0.9 * config.dp.target_epsilon  # calibration is tight
    assert json.loads((workdir / "privacy_report.json").read_text())["guarantee"] == guarantee


def test_pretrain_then_dp_finetune_from_its_ema(tmp_path, tiny_config):
    pre = tiny_config()
    pre.phase = "pretrain"
    pre.train.num_steps = 2
    pretrained = Trainer(pre, str(tmp_path / "pre"))
    pretrained.run()

    fine = tiny_config()
    fine.init_from = str(tmp_path / "pre")
    trainer = Trainer(fine, str(tmp_path / "dp"))
    assert trainer.step == 0 and trainer.ledger.total_steps == 0  # fresh privacy ledger
    assert _tree_equal(trainer.state["params"], pretrained.state["ema_params"])

    other = tiny_config()
    other.init_from = str(tmp_path / "pre")
    other.model.base_channels = 16
    with pytest.raises(ValueError, match="incompatible: parameter"):
        Trainer(other, str(tmp_path / "dp_other"))

    # Fine-tuning on the private part of a split needs a model pretrained on its public part.
    private = tiny_config()
    private.init_from = str(tmp_path / "pre")
    private.data.public_fraction, private.data.subset = 0.2, "private"
    with pytest.raises(ValueError, match="pretrained on the public subset of the same split"):
        Trainer(private, str(tmp_path / "dp_private"))

    # A DP config pointed at the pretraining workdir itself must not resume it without a ledger.
    with pytest.raises(ValueError, match="holds a 'pretrain' run"):
        Trainer(tiny_config(), str(tmp_path / "pre"))


@pytest.mark.parametrize("field, value, message", [
    ("data.name", "cifar100", "unknown dataset"),
    ("data.image_size", 9, "image_size"),
    ("train.batch_size", 5000, "larger than the dataset"),
    ("dp.target_epsilon", 0.0, "dp.target_epsilon"),
    ("dp.delta", 1.5, "dp.delta"),
    ("dp.clip_norm", -1.0, "dp.clip_norm"),
    ("dp.trainable", "no_such_layer", "selects no parameter"),
    ("phase", "finetune", "phase"),
    ("init_reinit", "label_embed", "init_reinit is set but init_from is not"),
])
def test_bad_config_fails_before_training(tmp_path, tiny_config, field, value, message):
    config = tiny_config()
    section, _, name = field.rpartition(".")
    setattr(config[section] if section else config, name, value)
    with pytest.raises(ValueError, match=message):
        Trainer(config, str(tmp_path))


def test_missing_init_from_and_unwritable_workdir_fail_early(tmp_path, tiny_config):
    config = tiny_config()
    config.init_from = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        Trainer(config, str(tmp_path / "wd"))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="not writable"):
        Trainer(tiny_config(), str(blocker / "wd"))


@pytest.mark.slow
def test_eight_devices_train_like_one(run_multidevice, finished_run):
    """The same DP run on 8 simulated devices ends with the 1-device parameters."""
    trainer, _, workdir = finished_run
    eight = run_multidevice(
        f"""
        import importlib.util, jax, numpy as np
        from jaxdpdm.train import Trainer
        spec = importlib.util.spec_from_file_location("quickstart", "configs/quickstart.py")
        module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
        trainer = Trainer(module.get_config("tiny"), {str(workdir / "eight_devices")!r})
        assert trainer.num_devices == 8
        trainer.run()
        result = [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(trainer.state["params"])]
    """, num_devices=8)
    one = jax.tree.leaves(trainer.state["params"])
    assert len(eight) == len(one)
    for a, b in zip(eight, one):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b).ravel(), rtol=1e-4, atol=1e-6)


# --- hardening (issue 13): privacy holes and fault handling ------------------------------------


def _copy_workdir(source, target):
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(LOCK_NAME))
    return target


def test_a_fixed_seed_is_warned_about_and_stated_in_the_report(finished_run):
    _, result, workdir = finished_run  # the tiny config fixes seed=0
    assert result["privacy"]["guarantee"]["seed_fixed_by_config"] is True
    text = (workdir / "privacy_report.txt").read_text()
    assert "WARNING: the seed was fixed by the config" in text
    assert not (workdir / LOCK_NAME).exists()  # released at the end of the run


def test_progress_lines_carry_the_epsilon_spent_and_the_peak_memory(finished_run):
    _, result, workdir = finished_run
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines][-1] == 3
    assert all(line["host_peak_gb"] > 0.1 for line in lines)  # a jax process holds > 100 MB
    guarantee = result["privacy"]["guarantee"]
    enforced = guarantee["epsilon_" + guarantee["enforced_accountant"]]
    assert lines[-1]["epsilon"] == pytest.approx(enforced)  # the last line is the whole run


@pytest.mark.parametrize("sigma", [0.0, -1.0])
def test_a_dp_run_without_noise_is_refused_before_writing_anything(tmp_path, tiny_config, sigma):
    config = tiny_config()
    config.dp.noise_multiplier = sigma
    with pytest.raises(ValueError, match="dp.noise_multiplier must be > 0"):
        Trainer(config, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()
    # A checkpoint written by a version that accepted sigma = 0 cannot be resumed either.
    with pytest.raises(ValueError, match="added no noise"):
        resumed_noise_multiplier(0.0, tiny_config())


def test_a_changed_dataset_is_refused_on_resume(tmp_path, tiny_config, finished_run):
    _, _, workdir = finished_run
    config = tiny_config()
    config.data.max_examples = 500
    with pytest.raises(ValueError, match="data differ from the checkpoint's .*max_examples"):
        Trainer(config, str(_copy_workdir(workdir, tmp_path / "wd")))


def test_a_changed_model_is_refused_on_resume_naming_an_array(tmp_path, tiny_config,
                                                             finished_run):
    _, _, workdir = finished_run
    config = tiny_config()
    config.model.base_channels = 16  # the tiny preset has 8
    with pytest.raises(ValueError) as raised:
        Trainer(config, str(_copy_workdir(workdir, tmp_path / "wd")))
    message = str(raised.value)
    assert "does not match this model/optimizer: array '" in message
    assert "in the checkpoint and" in message and "use a new workdir" in message


def test_the_fingerprint_covers_the_content(tiny_config):
    config = tiny_config()
    dataset = build_experiment(config).dataset
    original = dataset_fingerprint(config, dataset)
    images = dataset.images.copy()
    images[7, 0, 0, 0] ^= 1
    changed = dataset_fingerprint(config, dataclasses.replace(dataset, images=images))
    assert fingerprint_mismatch(original, changed).startswith("sha256")
    assert fingerprint_mismatch(original, dataset_fingerprint(config, dataset)) is None
    assert original["num_examples"] == 1442 and sum(original["class_counts"]) == 1442


def test_a_workdir_with_a_report_but_no_checkpoint_is_not_retrained_silently(
        tmp_path, tiny_config, finished_run):
    _, first, workdir = finished_run
    spent = _copy_workdir(workdir, tmp_path / "spent")
    shutil.rmtree(spent / "checkpoints")  # the checkpoints were lost, the release was not
    with pytest.raises(
            ValueError, match="traces of an earlier DP run .*privacy_report.json"
            ".*--allow_restart_spent_workdir"):
        Trainer(tiny_config(), str(spent))
    assert (spent / "privacy_report.json").exists()

    second = Trainer(tiny_config(), str(spent), allow_restart_spent_workdir=True).run()
    kept = json.loads((spent / "privacy_report.earlier-1.json").read_text())
    assert kept["guarantee"] == first["privacy"]["guarantee"]
    report = json.loads((spent / "privacy_report.json").read_text())
    eps = [
        first["privacy"]["guarantee"]["epsilon_pld"], second["privacy"]["guarantee"]["epsilon_pld"]
    ]
    assert report["earlier_releases"] == [{
        "report": "privacy_report.earlier-1.json", "epsilon_pld": eps[0], "delta": 1e-5
    }]
    assert report["composition"]["epsilon_total"] == pytest.approx(sum(eps))
    assert report["composition"]["delta_total"] == pytest.approx(2e-5)
    assert "EARLIER RELEASE" in (spent / "privacy_report.txt").read_text()


def test_sigterm_in_a_step_that_ends_on_a_checkpoint_exits_143(tmp_path, tiny_config):
    trainer = Trainer(tiny_config(), str(tmp_path))  # checkpoint_every=2
    step_once = trainer.train_step

    def step_with_preemption_notice():
        metrics = step_once()
        if trainer.step == 2:  # the notice arrives during step 2, whose end is a checkpoint
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    trainer.train_step = step_with_preemption_notice
    with pytest.raises(SystemExit) as info:
        trainer.run()
    assert info.value.code == 143
    assert trainer.store.all_steps() == [2]
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_failed_checkpoint_write_is_not_retried_by_the_crash_handler(tmp_path, tiny_config):
    # A full disk: the first write's error must reach the user, not a retry's second traceback.
    trainer = Trainer(tiny_config(), str(tmp_path))  # checkpoint_every=2
    attempts = []

    def disk_full(step, state, meta):
        attempts.append(step)
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "checkpoints"))

    trainer.store.save = disk_full
    with pytest.raises(OSError) as info:
        trainer.run()
    assert info.value.errno == errno.ENOSPC
    assert attempts == [2]
    assert not (tmp_path / LOCK_NAME).exists()


def _truncate_meta(checkpoint):
    path = checkpoint / "meta" / "metadata"
    path.write_text(path.read_text()[:100])


def _empty_data_files(checkpoint):
    for path in (checkpoint / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(b"")


CORRUPTIONS = {
    "truncated metadata": _truncate_meta,
    "missing manifest": lambda c: (c / "state" / "manifest.ocdbt").unlink(),
    "emptied data files": _empty_data_files,
    "missing meta": lambda c: shutil.rmtree(c / "meta"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_config,
                                                                    finished_run, caplog,
                                                                    corruption):
    full, _, workdir = finished_run
    wd = _copy_workdir(workdir, tmp_path / "wd")
    CORRUPTIONS[corruption](wd / "checkpoints" / "3")
    with caplog.at_level(logging.WARNING):
        resumed = Trainer(tiny_config(), str(wd))
    assert resumed.step == 2 and resumed.ledger.total_steps == 2
    assert "checkpoint 3 in" in caplog.text and "does not restore" in caplog.text
    assert (wd / "checkpoints" / "3.unrestorable").is_dir()  # kept, out of the way
    if corruption == "missing meta":  # one of them runs on: the replayed step 3 is identical
        resumed.run()
        assert resumed.store.all_steps() == [2, 3]
        assert _tree_equal(resumed.state["params"], full.state["params"])
    else:
        resumed.release_workdir()


def test_no_restorable_checkpoint_is_one_clear_error(tmp_path, tiny_config, finished_run):
    _, _, workdir = finished_run
    wd = _copy_workdir(workdir, tmp_path / "wd")
    _truncate_meta(wd / "checkpoints" / "3")
    shutil.rmtree(wd / "checkpoints" / "2" / "meta")
    with pytest.raises(ValueError, match="no checkpoint in .* restores: step 3: .*; step 2: ") \
            as info:
        Trainer(tiny_config(), str(wd))
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(wd / "checkpoints")) == ["2", "3"]  # nothing deleted or renamed
    assert not (wd / LOCK_NAME).exists()


def test_delta_of_at_least_one_over_n_warns_once_when_a_run_starts(tiny_config):
    """The ledger and the calibration used to warn about delta >= 1/N twice."""
    config = tiny_config()
    config.dp.delta, config.dp.accountant = 0.01, "rdp"  # rdp: PLD at this small sigma is slow
    with pytest.warns(UserWarning) as caught:
        ledger = accounting.PrivacyLedger(config.dp.target_epsilon, config.dp.delta,
                                          accountant="rdp", num_examples=100)
        calibrated_noise_multiplier(config, config.train.batch_size / 100, ledger)
    assert sum("1/N" in str(w.message) for w in caught) == 1
