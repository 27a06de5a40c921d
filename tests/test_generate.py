"""`load_trained`: the EMA parameters of a workdir's newest checkpoint, checked against the config.

Sampling itself is covered end to end by tests/test_main.py. The checkpoints here are written
from parameter *shapes* (`jax.eval_shape`), so nothing is compiled.
"""

import json
import logging
import os

import jax
import numpy as np
import pytest

from jaxdpdm import checkpoint, generate
from jaxdpdm.dp import report
from jaxdpdm.experiment import build_experiment


@pytest.mark.parametrize("make_workdir", ["empty", "missing"])
def test_load_trained_without_a_checkpoint_raises_file_not_found(tmp_path, tiny_config,
                                                                 make_workdir):
    workdir = tmp_path / "run"
    if make_workdir == "empty":
        workdir.mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        generate.load_trained(tiny_config(), str(workdir))


def _save(workdir, ema_params, num_classes=10, step=3):
    store = checkpoint.CheckpointStore(os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR))
    state = {"step": np.asarray(step, np.int32), "params": ema_params, "ema_params": ema_params}
    store.save(step, state, {"num_classes": num_classes, "phase": "dp"})
    store.close()


def _shaped_like_the_model(config, num_classes=10):
    exp = build_experiment(config, num_classes=num_classes)
    shapes = jax.eval_shape(exp.init_params)
    return jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), shapes)


def test_load_trained_returns_the_ema_parameters_and_a_dataless_experiment(tmp_path, tiny_config):
    config = tiny_config()
    config.seed = None  # sampling needs no seed
    ema = _shaped_like_the_model(tiny_config(), num_classes=4)
    _save(str(tmp_path), ema, num_classes=4, step=3)
    exp, params, meta = generate.load_trained(config, str(tmp_path))
    assert exp.dataset is None
    assert exp.unet_config.num_classes == 4  # from the checkpoint, not the data
    assert meta["step"] == 3 and meta["num_classes"] == 4
    assert jax.tree.structure(params) == jax.tree.structure(ema)
    for leaf in jax.tree.leaves(params):
        np.testing.assert_array_equal(np.asarray(leaf), 0.5)


def test_load_trained_refuses_a_checkpoint_of_another_model(tmp_path, tiny_config):
    ema = _shaped_like_the_model(tiny_config())
    _save(str(tmp_path), ema)
    config = tiny_config()
    config.model.base_channels = 16  # not the model that was trained
    with pytest.raises(ValueError, match="does not fit the model"):
        generate.load_trained(config, str(tmp_path))


# --- sampling an unfinished run, and again after training moved on ----------------------------


@pytest.fixture
def gray_sampler(monkeypatch, tiny_config):
    """Replaces the compiled sampler by one that returns mid-gray images (nothing compiles)."""
    data = tiny_config().data
    shape = (data.image_size, data.image_size, data.channels)

    def jit_sampler(sample, params, schedule, **kwargs):
        return lambda key, labels: np.zeros((len(labels), *shape), np.float32)

    monkeypatch.setattr(generate.sampling, "jit_sampler", jit_sampler)


def _sample_config(tiny_config):
    config = tiny_config()
    config.sample.num_samples, config.sample.batch_size = 8, 4
    return config


def test_sampling_an_unfinished_run_warns_and_records_the_step(tmp_path, tiny_config,
                                                               fake_checkpoint, gray_sampler,
                                                               caplog):
    config = _sample_config(tiny_config)  # train.num_steps = 3
    fake_checkpoint(str(tmp_path), config, step=2)
    with caplog.at_level(logging.WARNING, logger="jaxdpdm.generate"):
        generate.sample_from_workdir(config, str(tmp_path))
    assert "checkpoint step 2 is from an unfinished run (train.num_steps=3)" in caplog.text
    meta = json.loads((tmp_path / "samples" / "meta.json").read_text())
    assert meta["checkpoint_step"] == 2


def test_sampling_again_after_training_moved_on_replaces_the_old_samples(
        tmp_path, tiny_config, fake_checkpoint, gray_sampler, caplog):
    """This used to fail ("different settings") until samples/ was deleted by hand."""
    config = _sample_config(tiny_config)
    fake_checkpoint(str(tmp_path), config, step=2)
    generate.sample_from_workdir(config, str(tmp_path))
    fake_checkpoint(str(tmp_path), config, step=3)  # training finished
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxdpdm.generate"):
        summary = generate.sample_from_workdir(config, str(tmp_path))
    assert "unfinished" not in caplog.text and "moved them to" in caplog.text
    assert summary.num_generated == 2 and summary.num_reused == 0
    assert json.loads((tmp_path / "samples" / "meta.json").read_text())["checkpoint_step"] == 3
    archived = tmp_path / "samples_step000002"
    assert json.loads((archived / "meta.json").read_text())["checkpoint_step"] == 2
    assert sorted(
        p.name for p in archived.glob("chunk_*.npz")) == ["chunk_00000.npz", "chunk_00001.npz"]
    # A workdir whose checkpoints are lost still shows that these samples were released.
    assert {"samples", "samples_grid.png",
            "samples_step000002"} <= set(report.release_traces(str(tmp_path)))
    # The same checkpoint again: the samples are reused, nothing is moved.
    again = generate.sample_from_workdir(config, str(tmp_path))
    assert again.num_reused == 2 and not (tmp_path / "samples_step000003").exists()


def test_a_run_stopped_by_its_budget_is_finished(tmp_path, tiny_config, fake_checkpoint):
    config = tiny_config()
    fake_checkpoint(str(tmp_path), config, step=2)
    meta = {"config": config.to_json(), "step": 2}
    assert "unfinished" in generate.unfinished_run_note(meta, str(tmp_path))
    (tmp_path / "privacy_report.json").write_text(
        json.dumps({"training": {"stopped_by_budget": True}, "mechanism": {"steps": 2}}))
    assert generate.unfinished_run_note(meta, str(tmp_path)) is None
    assert generate.unfinished_run_note({"config": config.to_json(), "step": 3}, "/none") is None
