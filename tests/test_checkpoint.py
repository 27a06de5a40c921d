"""Checkpoints: round trips of state + meta, retention, shape checks, and `init_from` loading."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdpdm import checkpoint
from jaxdpdm.checkpoint import CheckpointStore


def _params(scale: float = 1.0, *, num_labels: int = 11, width: int = 4) -> dict:
    """A small UNet-like tree: `params/Dense_0/{bias,kernel}`, `params/label_embed/embedding`."""
    return {
        "params": {
            "Dense_0": {
                "kernel": scale * jnp.arange(3 * width, dtype=jnp.float32).reshape(3, width),
                "bias": scale * jnp.ones((width,), jnp.float32)
            },
            "label_embed": {"embedding": scale * jnp.full((num_labels, width), 0.5, jnp.float32)},
        }
    }


def _state(step: int) -> dict:
    """The training state's layout: step, params, EMA and an Adam state that has taken a step."""
    params = _params(float(step))
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = optimizer.update(grads, opt_state, params)
    return {
        "step": jnp.asarray(step, jnp.int32), "params": params,
        "ema_params": jax.tree.map(lambda x: x + 0.25, params), "opt_state": opt_state
    }


def _meta(step: int) -> dict:
    return {
        "num_classes": 10, "noise_multiplier": 1.5,
        "ledger": {"phases": [{"noise_multiplier": 1.5, "sampling_rate": 0.01,
                               "steps": step}]}, "note": f"step {step}"
    }


def _assert_trees_equal(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert np.shape(a) == np.shape(e) and np.asarray(a).dtype == np.asarray(e).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir whose store (keep=2) has saved steps 1, 2, 3: `(workdir, store)`."""
    workdir = tmp_path_factory.mktemp("workdir")
    store = CheckpointStore(os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR), keep=2)
    for step in (1, 2, 3):
        store.save(step, _state(step), _meta(step))
    yield str(workdir), store
    store.close()


def test_keep_retains_only_the_newest_checkpoints(saved):
    workdir, store = saved
    assert store.all_steps() == [2, 3]
    assert store.latest_step() == 3
    on_disk = os.listdir(os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR))
    assert sorted(name for name in on_disk if not name.startswith(".")) == ["2", "3"]


@pytest.mark.parametrize("step", [None, 2, 3])
def test_restore_round_trips_state_and_meta(saved, step):
    _, store = saved
    expected_step = 3 if step is None else step
    state, meta = store.restore(_state(0), step)
    _assert_trees_equal(state, _state(expected_step))
    assert meta == _meta(expected_step)


def test_restore_keeps_the_optax_state_types(saved):
    _, store = saved
    state, _ = store.restore(_state(0))
    adam_state = state["opt_state"][0]
    assert isinstance(adam_state, optax.ScaleByAdamState)
    assert int(adam_state.count) == 1


@pytest.mark.parametrize("step", [2, 3])
def test_restore_meta_reads_only_the_metadata(saved, step):
    _, store = saved
    assert store.restore_meta(step) == _meta(step)


def test_restore_meta_defaults_to_the_newest(saved):
    _, store = saved
    assert store.restore_meta()["note"] == "step 3"


def _reshape_kernel(state):
    state["params"]["params"]["Dense_0"]["kernel"] = jnp.zeros((5, 4), jnp.float32)


def _add_array(state):
    state["opt_state"][0].mu["params"]["Dense_0"]["extra"] = jnp.zeros((2,), jnp.float32)


def _drop_array(state):
    del state["ema_params"]["params"]["label_embed"]


@pytest.mark.parametrize("mutate, message", [
    (_reshape_kernel, "array 'params/params/Dense_0/kernel' has shape (3, 4) in the checkpoint "
     "and (5, 4) here"),
    (_add_array, "array 'opt_state/0/mu/params/Dense_0/extra' is only in this model/optimizer"),
    (_drop_array, "array 'ema_params/params/label_embed/embedding' is only in the checkpoint"),
])
def test_restore_into_a_target_of_another_layout_names_the_first_difference(
        saved, mutate, message):
    _, store = saved
    target = _state(0)
    mutate(target)
    with pytest.raises(ValueError) as raised:
        store.restore(target)
    assert str(raised.value).endswith("does not match this model/optimizer: " + message)


def test_restore_casts_to_the_target_dtype(saved):
    """Dtypes are not part of the layout check: the saved float32 arrays fill a bfloat16 target."""
    _, store = saved
    target = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x,
                          _state(0))
    state, _ = store.restore(target)
    assert state["params"]["params"]["Dense_0"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(state["params"]["params"]["Dense_0"]["kernel"], np.float32),
        np.asarray(_state(3)["params"]["params"]["Dense_0"]["kernel"]))


def test_restore_arrays_needs_no_target(saved):
    _, store = saved
    state, meta = store.restore_arrays(2)
    assert meta == _meta(2)
    expected = _state(2)
    for name in ("params", "ema_params"):
        _assert_trees_equal(state[name], jax.tree.map(np.asarray, expected[name]))
    assert int(state["step"]) == 2


def test_a_new_store_on_an_existing_folder_sees_its_checkpoints(saved):
    workdir, _ = saved
    reopened = CheckpointStore(checkpoint.checkpoint_dir(workdir), create=False)
    try:
        assert reopened.all_steps() == [2, 3]
        assert reopened.restore_meta()["note"] == "step 3"
    finally:
        reopened.close()


def test_restore_from_an_empty_store_raises_file_not_found(tmp_path):
    store = CheckpointStore(str(tmp_path / "empty"))
    try:
        assert store.latest_step() is None
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            store.restore_meta()
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            store.restore_arrays()
    finally:
        store.close()


# --- locating checkpoints -----------------------------------------------------------------------


def test_checkpoint_dir_and_has_checkpoint_on_a_workdir(saved):
    workdir, _ = saved
    folder = os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR)
    assert checkpoint.checkpoint_dir(workdir) == folder
    assert checkpoint.has_checkpoint(workdir)


def test_checkpoint_dir_and_has_checkpoint_on_the_checkpoint_folder(saved):
    workdir, _ = saved
    folder = os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR)
    assert checkpoint.checkpoint_dir(folder) == folder
    assert checkpoint.has_checkpoint(folder)


def test_relative_paths_are_made_absolute(saved, monkeypatch):
    workdir, _ = saved
    monkeypatch.chdir(os.path.dirname(workdir))
    relative = os.path.basename(workdir)
    assert checkpoint.checkpoint_dir(relative) == os.path.join(workdir,
                                                               checkpoint.CHECKPOINT_SUBDIR)
    assert checkpoint.has_checkpoint(relative)


@pytest.mark.parametrize("layout", ["empty", "empty_checkpoints", "missing", "only_temp"])
def test_has_checkpoint_is_false_without_a_complete_checkpoint(tmp_path, layout):
    path = tmp_path / "run"
    if layout != "missing":
        path.mkdir()
    if layout == "empty_checkpoints":
        (path / checkpoint.CHECKPOINT_SUBDIR).mkdir()
    if layout == "only_temp":
        # What an interrupted orbax write leaves behind: not a complete checkpoint.
        (path / checkpoint.CHECKPOINT_SUBDIR / "4.orbax-checkpoint-tmp-1").mkdir(parents=True)
    assert not checkpoint.has_checkpoint(str(path))
    if layout == "empty":
        assert checkpoint.checkpoint_dir(str(path)) == str(path)


# --- load_init_params -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A workdir with one checkpoint whose EMA parameters are `_params(2) + 0.25`."""
    workdir = tmp_path_factory.mktemp("pretrained")
    store = CheckpointStore(os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR), keep=1)
    store.save(2, _state(2), _meta(2))
    store.close()
    return str(workdir)


def test_load_init_params_loads_the_ema_parameters(pretrained):
    template = _params(-7.0)
    loaded = checkpoint.load_init_params(pretrained, template)
    _assert_trees_equal(loaded, jax.tree.map(lambda x: x + 0.25, _params(2.0)))


def test_load_init_params_accepts_the_checkpoint_folder(pretrained):
    folder = os.path.join(pretrained, checkpoint.CHECKPOINT_SUBDIR)
    loaded = checkpoint.load_init_params(folder, _params(-7.0))
    np.testing.assert_array_equal(loaded["params"]["Dense_0"]["bias"], np.full((4,), 2.25))


def test_load_init_params_casts_to_the_template_dtype(pretrained):
    template = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params())
    loaded = checkpoint.load_init_params(pretrained, template)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(loaded))


def test_load_init_params_names_the_missing_parameter(pretrained):
    template = _params()
    template["params"]["Dense_1"] = {"kernel": jnp.zeros((2, 2))}
    with pytest.raises(ValueError, match="'params/Dense_1/kernel' is missing"):
        checkpoint.load_init_params(pretrained, template)


def test_load_init_params_names_the_extra_parameter(pretrained):
    template = _params()
    del template["params"]["Dense_0"]["bias"]
    with pytest.raises(ValueError, match="has parameter 'params/Dense_0/bias'"):
        checkpoint.load_init_params(pretrained, template)


def test_load_init_params_names_the_wrongly_shaped_parameter(pretrained):
    with pytest.raises(
            ValueError, match=r"'params/label_embed/embedding' has shape \(11, 4\) "
            r"there and \(3, 4\) here"):
        checkpoint.load_init_params(pretrained, _params(num_labels=3))


def test_reinit_pattern_keeps_fresh_values_only_for_mismatched_matches(pretrained):
    template = _params(-1.0, num_labels=3)
    loaded = checkpoint.load_init_params(pretrained, template, reinit_pattern="label_embed")
    # Mismatched and matching the pattern: the fresh initialisation.
    np.testing.assert_array_equal(loaded["params"]["label_embed"]["embedding"],
                                  template["params"]["label_embed"]["embedding"])
    # Everything else comes from the checkpoint.
    np.testing.assert_array_equal(loaded["params"]["Dense_0"]["kernel"],
                                  np.asarray(_params(2.0)["params"]["Dense_0"]["kernel"]) + 0.25)


def test_reinit_pattern_does_not_reinit_parameters_of_the_same_shape(pretrained):
    loaded = checkpoint.load_init_params(pretrained, _params(-1.0), reinit_pattern="label_embed")
    np.testing.assert_array_equal(loaded["params"]["label_embed"]["embedding"],
                                  np.full((11, 4), 2 * 0.5 + 0.25, np.float32))


def test_reinit_pattern_does_not_excuse_other_mismatches(pretrained):
    with pytest.raises(ValueError, match="params/Dense_0/"):
        checkpoint.load_init_params(pretrained, _params(width=5), reinit_pattern="label_embed")


@pytest.mark.parametrize("make_path", [lambda tmp: tmp / "nowhere", lambda tmp: tmp])
def test_load_init_params_without_a_checkpoint_raises_file_not_found(tmp_path, make_path):
    with pytest.raises(FileNotFoundError):
        checkpoint.load_init_params(str(make_path(tmp_path)), _params())


def test_a_disk_too_full_for_the_arrays_refuses_before_writing(tmp_path, monkeypatch):
    # orbax's own full-disk failure is a wall of tracebacks from tensorstore's threads.
    import collections
    import errno

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    store = CheckpointStore(str(tmp_path / "checkpoints"))
    try:
        with pytest.raises(OSError) as info:
            store.save(2, {"w": np.zeros((64, 64), np.float32)}, {"step": 2})
        assert info.value.errno == errno.ENOSPC and "needs about" in str(info.value)
        assert store.all_steps() == []
    finally:
        store.close()
