"""`load_trained`: the EMA parameters of a workdir's newest checkpoint, checked against the config.

Sampling itself is covered end to end by tests/test_main.py. The checkpoints here are written
from parameter *shapes* (`jax.eval_shape`), so nothing is compiled.
"""

import os

import jax
import numpy as np
import pytest

from jaxdpdm import checkpoint, generate
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


def test_load_trained_returns_the_ema_parameters_and_a_dataless_experiment(tmp_path,
                                                                          tiny_config):
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
