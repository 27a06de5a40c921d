"""The config -> typed objects boundary: data spec, UNet config, keys, host batches, the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdpdm import experiment, sampling
from jaxdpdm.data import DataSpec


@pytest.fixture(scope="module")
def tiny_experiment(tiny_config):
    """The quickstart ":tiny" experiment with its data (8x8 digits, 10 classes)."""
    return experiment.build_experiment(tiny_config())


def _key_bits(key) -> np.ndarray:
    return np.asarray(jax.random.key_data(key))


def test_unet_config_comes_from_the_data_and_the_model_config(tiny_experiment, tiny_config):
    config = tiny_config()
    u, data = tiny_experiment.unet_config, tiny_experiment.dataset
    assert data is not None
    assert data.images.shape[1:] == (u.image_size, u.image_size, u.in_channels) == (8, 8, 1)
    assert u.num_classes == data.num_classes == 10
    assert tiny_experiment.null_label == 10  # the extra "no class" row for guidance
    assert u.base_channels == config.model.base_channels
    assert u.channel_mult == tuple(config.model.channel_mult)
    assert u.attention_resolutions == tuple(config.model.attention_resolutions)
    assert tiny_experiment.schedule.num_timesteps == config.diffusion.num_timesteps
    assert tiny_experiment.timestep_dist.ranges == ((0, 1000),)


def test_building_with_num_classes_loads_no_data(tiny_config, monkeypatch):

    def no_loading(spec):
        raise AssertionError(f"data was loaded: {spec}")

    monkeypatch.setattr(experiment, "load_dataset", no_loading)
    config = tiny_config()
    config.data.name = "fashion_mnist"  # not available here: must not be touched
    exp = experiment.build_experiment(config, num_classes=7)
    assert exp.dataset is None
    assert exp.unet_config.num_classes == 7 and exp.null_label == 7


def test_a_given_dataset_fixes_the_number_of_classes(tiny_experiment, tiny_config, monkeypatch):
    monkeypatch.setattr(experiment, "load_dataset", None)
    exp = experiment.build_experiment(tiny_config(), tiny_experiment.dataset, num_classes=3)
    assert exp.dataset is tiny_experiment.dataset
    assert exp.unet_config.num_classes == 10


def test_unconditional_model_has_no_classes(tiny_config):
    config = tiny_config()
    config.model.class_conditional = False
    exp = experiment.build_experiment(config, num_classes=10)
    assert exp.unet_config.num_classes is None and exp.null_label is None


def test_unet_config_refuses_an_unbuildable_architecture(tiny_config):
    config = tiny_config()
    config.model.channel_mult = (1, 2, 2, 2)  # four levels: 12x12 cannot be halved 3 times
    config.data.image_size = 12
    with pytest.raises(ValueError, match="image_size"):
        experiment.unet_config(config, 10)


def test_timestep_distribution_from_config_lists(tiny_config):
    config = tiny_config()
    config.diffusion.timestep_ranges = ([0, 200], [200, 1000])
    config.diffusion.timestep_weights = (1, 3)
    dist = experiment.timestep_distribution(config)
    assert dist.ranges == ((0, 200), (200, 1000))
    assert dist.weights == pytest.approx((0.25, 0.75))
    hash(dist)  # a static jit argument


@pytest.mark.parametrize("indices", [[5, 0, 7], [1441], list(range(16))])
def test_host_batch_gathers_by_dataset_index(tiny_experiment, indices):
    indices = np.asarray(indices, np.int64)
    batch = tiny_experiment.host_batch(indices)
    data = tiny_experiment.dataset
    assert set(batch) == {"image", "label", "index"}
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (len(indices), 8, 8, 1)
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (len(indices),)
    assert batch["index"].dtype == np.int32
    np.testing.assert_array_equal(batch["image"], data.images[indices])
    np.testing.assert_array_equal(batch["label"], data.labels[indices])
    np.testing.assert_array_equal(batch["index"], indices)


def test_example_key_is_a_typed_key_that_depends_on_seed_and_step(tiny_config):
    keys = {}
    for seed in (0, 1):
        config = tiny_config()
        config.seed = seed
        exp = experiment.build_experiment(config, num_classes=10)
        for step in (0, 1, 2):
            key = exp.example_key(step)
            assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
            keys[seed, step] = _key_bits(key).tobytes()
            # Deterministic: resuming recomputes the same key.
            assert _key_bits(exp.example_key(step)).tobytes() == keys[seed, step]
    assert len(set(keys.values())) == len(keys)


def test_example_and_sample_keys_are_different_streams(tiny_experiment):
    for tag in (0, 1):
        assert not np.array_equal(_key_bits(tiny_experiment.example_key(tag)),
                                  _key_bits(tiny_experiment.sample_key(tag)))


def test_loss_fn_on_one_example_is_a_finite_scalar(tiny_experiment, tiny_config):
    # A one-level UNet: compiling it takes a few seconds where the tiny quickstart UNet (and
    # its jitted initialiser) take tens of seconds on a loaded 2-core machine.
    config = tiny_config()
    config.model.base_channels = 4
    config.model.channel_mult = (1,)
    config.model.attention_resolutions = ()
    exp = experiment.build_experiment(config, num_classes=10)
    # Parameters from shapes only, with random values: no initialiser to compile.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype),
                          jax.eval_shape(exp.init_params))
    example = jax.tree.map(lambda x: x[0], tiny_experiment.host_batch(np.asarray([3])))
    loss = jax.jit(exp.loss_fn)
    values = [loss(params, example, jax.random.fold_in(exp.example_key(0), i)) for i in range(2)]
    for value in values:
        assert value.shape == () and value.dtype == jnp.float32
        assert np.isfinite(float(value)) and float(value) > 0
    # The rng drives timesteps and noise, so two keys give two losses.
    assert float(values[0]) != float(values[1])


@pytest.mark.parametrize("phase, choice, expected", [
    ("dp", "xla", "xla"),
    ("dp", "patch_matmul", "patch_matmul"),
    ("pretrain", "xla", "xla"),
    ("pretrain", "patch_matmul", "xla"),  # non-private steps always take XLA's gradient
])
def test_conv_impl_follows_the_phase_and_the_dp_choice(tiny_config, phase, choice, expected):
    config = tiny_config()
    config.phase, config.dp.conv_impl = phase, choice
    assert experiment.conv_impl(config) == expected
    assert experiment.unet_config(config, 10).conv_impl == expected


def test_conv_impls_give_the_same_per_example_gradients_of_the_loss(tiny_experiment, tiny_config):
    """The whole per-example loss (UNet with attention, K draws, label dropout) under
    vmap(grad), as the DP step takes it: both DP conv implementations agree."""
    rng = np.random.default_rng(1)
    batch = tiny_experiment.host_batch(np.arange(3))
    keys = jax.vmap(lambda i: jax.random.fold_in(tiny_experiment.example_key(0), i))(
        jnp.arange(3))
    grads = {}
    for impl in ("xla", "patch_matmul"):
        config = tiny_config()
        config.dp.conv_impl = impl
        exp = experiment.build_experiment(config, num_classes=10)
        assert exp.unet_config.conv_impl == impl
        if not grads:  # the same random parameters for both
            params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype),
                                  jax.eval_shape(exp.init_params))
        per_example = jax.jit(jax.vmap(jax.grad(exp.loss_fn), (None, 0, 0)))
        grads[impl] = per_example(params, batch, keys)
    for a, b in zip(jax.tree.leaves(grads["patch_matmul"]), jax.tree.leaves(grads["xla"])):
        assert a.shape[0] == 3
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_sampler_follows_config_sample_and_matches_the_generation_path(
        tiny_experiment, tiny_config):
    config = tiny_config()
    config.sample.ddim_steps, config.sample.guidance_scale = 2, 0.5
    exp = experiment.build_experiment(config, tiny_experiment.dataset)
    params = exp.init_params()
    key, labels = jax.random.key(5), jnp.arange(2, dtype=jnp.int32)
    # Monitoring jits the pure sampler; --mode=sample binds it with jit_sampler: same images.
    grid = jax.jit(exp.sampler())(params, exp.schedule, key, labels)
    generated = sampling.jit_sampler(exp.sampler(), params, exp.schedule)(key, labels)
    assert grid.shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(np.asarray(grid), np.asarray(generated))
    # DDPM ignores ddim_steps (it runs all T steps) instead of refusing it.
    config.sample.sampler = "ddpm"
    assert callable(experiment.build_experiment(config, tiny_experiment.dataset).sampler())


def test_sampler_refuses_guidance_for_an_unconditional_model(tiny_config):
    config = tiny_config()
    config.model.class_conditional, config.sample.guidance_scale = False, 1.0
    with pytest.raises(ValueError, match="null_label"):
        experiment.build_experiment(config, num_classes=10).sampler()


# --- data_spec -------------------------------------------------------------------------------------


def test_data_spec_mirrors_config_data(tiny_config):
    config = tiny_config()
    spec = experiment.data_spec(config)
    assert isinstance(spec, DataSpec)
    assert (spec.name, spec.image_size, spec.channels, spec.split) == ("digits", 8, 1, "train")
    assert spec.classes is None


@pytest.mark.parametrize("name, split", [("digits", "test"), ("tfds:cifar10", "train[:90%]")])
def test_data_spec_split_override(tiny_config, name, split):
    config = tiny_config()
    config.data.name = name
    spec = experiment.data_spec(config, split=split)
    assert (spec.name, spec.split) == (name, split)
    assert config.data.split == "train"  # the config is not modified


def test_data_spec_classes_become_a_tuple(tiny_config):
    config = tiny_config()
    config.data.classes = (3, 5)
    spec = experiment.data_spec(config)
    assert spec.classes == (3, 5) and isinstance(spec.classes, tuple)


def test_data_spec_carries_every_data_field_but_test_split(tiny_config):
    config = tiny_config()
    config.data.max_examples = 100
    config.data.public_fraction = 0.5
    config.data.subset = "private"
    spec = experiment.data_spec(config)
    assert (spec.max_examples, spec.public_fraction, spec.subset) == (100, 0.5, "private")
    assert not hasattr(spec, "test_split")


def test_the_test_split_is_taken_whole(tiny_config):
    """The public/private subset and max_examples select training data, not the test set."""
    config = tiny_config()
    config.data.max_examples = 100
    config.data.public_fraction = 0.1
    config.data.subset = "private"
    spec = experiment.data_spec(config, split="test")
    assert (spec.split, spec.subset, spec.public_fraction, spec.max_examples) == ("test", "all",
                                                                                  0.0, None)
    assert experiment.data_spec(config).subset == "private"


# --- real_test_spec --------------------------------------------------------------------------------


def test_image_folder_needs_a_separate_test_folder(tiny_config, tmp_path):
    config = tiny_config()
    train_dir = str(tmp_path / "train")
    config.data.name, config.data.image_size, config.data.data_dir = "image_folder", 8, train_dir
    with pytest.raises(ValueError, match="set data.test_dir"):
        experiment.real_test_spec(config)
    # test_split=train used to evaluate on the training images under the "real test set" label
    config.data.test_dir = str(tmp_path / "train" / ".")
    with pytest.raises(ValueError, match="the training data"):
        experiment.real_test_spec(config)
    config.data.test_dir = str(tmp_path / "test")
    spec = experiment.real_test_spec(config)
    assert spec.data_dir == str(tmp_path / "test") and spec.name == "image_folder"


@pytest.mark.parametrize("field, value, message", [
    ("data.test_split", "train", "is the training split"),
    ("data.test_dir", "/some/folder", "data.test_split instead"),
])
def test_split_datasets_refuse_the_training_split(tiny_config, field, value, message):
    config = tiny_config()  # digits, split "train"
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=message):
        experiment.real_test_spec(config)
