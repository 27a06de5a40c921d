"""Tests of jaxdpdm.models.unet: shapes, parameter counts, conditioning, per-example
independence, dropout, mixed precision and config validation.

Everything that runs is the 8x8 "tiny" preset; larger models are only traced with
`jax.eval_shape` (no allocation, no compile).
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdpdm.models.unet import (
    PRESET_NAMES,
    UNet,
    UNetConfig,
    count_parameters,
    init_params,
    make_apply_fn,
    param_shapes,
    unet_preset,
)

TINY = unet_preset("tiny")
BATCH = 4


def random_params(config, seed):
    """Random parameters of `UNet(config)` drawn with numpy on the host.

    Real `init_params` leaves the output layers at zero (the network outputs exactly 0, hiding
    any dependence on the inputs), and compiling it costs XLA:CPU 10-30 s with a threefry key
    (one random program per parameter), so most tests use these: kernels ~ N(0, 1/fan_in),
    norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2), embeddings ~ N(0, 1).
    """
    rng = np.random.default_rng(seed)
    shapes = param_shapes(config)

    def draw(path, leaf):
        name = path[-1].key
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if name == "kernel":
            return jnp.asarray(noise / np.sqrt(np.prod(leaf.shape[:-1])))
        if name == "scale":
            return jnp.asarray(1 + 0.1 * noise)
        if name == "bias":
            return jnp.asarray(0.1 * noise)
        return jnp.asarray(noise)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def params():
    return random_params(TINY, seed=0)


@pytest.fixture(scope="module")
def initial_params():
    # An RBG key: same typed-key API, but its init program compiles several times faster on
    # XLA:CPU than threefry's (the library default is untouched).
    return init_params(TINY, jax.random.key(0, impl="rbg"))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((BATCH, 8, 8, 3)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, BATCH), jnp.int32)
    y = jnp.asarray([0, 4, 9, TINY.num_classes], jnp.int32)  # includes the null label
    return x, t, y


eval_apply = jax.jit(make_apply_fn(TINY, train=False))
train_apply = jax.jit(make_apply_fn(TINY, train=True))
# eval_apply ignores its rng; always passing the same kind of key keeps one compiled program.
NO_DROPOUT_KEY = jax.random.key(0)


@pytest.mark.parametrize("name,expected", [("tiny", 49_043), ("cpu_small", 439_505),
                                           ("paper_cifar", 89_110_083)])
def test_preset_parameter_counts(name, expected):
    assert count_parameters(unet_preset(name)) == expected


def test_paper_preset_is_80m_plus_at_32x32():
    config = unet_preset("paper_cifar")
    assert (config.image_size, config.in_channels, config.num_classes) == (32, 3, 10)
    assert config.attention_resolutions == (16, 8)
    assert count_parameters(config) >= 80_000_000


def test_cpu_init_compiled_cheaply_draws_the_optimised_programs_values(initial_params):
    """On CPU `init_params` is compiled with LLVM's cheap pipeline (it runs once); it must draw
    what the optimised program draws, up to float32 rounding."""
    from jaxdpdm.models import unet
    optimised = unet._init_jit(TINY, jax.random.key(0, impl="rbg"))
    chex.assert_trees_all_close(initial_params, optimised, rtol=1e-6, atol=1e-7)
    # Under a trace the initialisation is part of the caller's program (no compiler options).
    assert jax.tree.structure(param_shapes(TINY)) == jax.tree.structure(optimised)


def test_initialised_params_count_dtype_and_zero_init(initial_params, inputs):
    leaves = jax.tree.leaves(initial_params)
    assert sum(p.size for p in leaves) == count_parameters(TINY)
    assert all(p.dtype == jnp.float32 for p in leaves)
    assert "label_embed" in initial_params  # name other modules rely on (re-init regex)
    assert initial_params["label_embed"]["embedding"].shape == (
        TINY.num_classes + 1,
        TINY.embed_dim,
    )
    # The last layer of every residual branch, and the output conv, start at zero ...
    zero_init = {
        jax.tree_util.keystr(path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(initial_params)[0]
        if path[-1].key == "kernel" and path[-2].key in ("out_conv", "proj_out")
    }
    # tiny: 2 down + 2 middle + 4 up ResBlocks, 1 down + 1 middle + 2 up attention, output conv.
    assert len(zero_init) == 8 + 4 + 1
    assert all(not np.any(np.asarray(leaf)) for leaf in zero_init.values())
    # ... so the untrained network predicts exactly zero noise.
    x, t, y = inputs
    out = eval_apply(initial_params, x, t, y, NO_DROPOUT_KEY)
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def _output_struct(config, batch=2):
    x = jax.ShapeDtypeStruct((batch, config.image_size, config.image_size, config.in_channels),
                             jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    y = None if config.num_classes is None else jax.ShapeDtypeStruct((batch,), jnp.int32)
    model = UNet(config)
    out, variables = jax.eval_shape(
        lambda x, t, y: model.init_with_output(jax.random.key(0), x, t, y, train=False), x, t, y)
    return out, variables


@pytest.mark.parametrize(
    "overrides",
    [
        dict(image_size=28, channel_mult=(1, 2, 2), attention_resolutions=(14, 7)),
        dict(image_size=16, channel_mult=(1, 2, 2), attention_resolutions=(4,),
             resblock_updown=True),
        dict(
            image_size=32,
            channel_mult=(1, 2, 2, 2),
            attention_resolutions=(16, 8),
            conv_resample=False,
            in_channels=1,
        ),
        dict(image_size=12, channel_mult=(1, 1, 2), attention_resolutions=(), num_classes=None),
        dict(image_size=8, dtype="bfloat16"),
    ],
)
def test_output_shape_equals_input_shape(overrides):
    config = dataclasses.replace(TINY, **overrides)
    out, variables = _output_struct(config)
    assert out.shape == (2, config.image_size, config.image_size, config.in_channels)
    assert out.dtype == jnp.float32  # also for bfloat16 compute
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))


def test_accepts_float_timesteps_and_batch_one(params):
    x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32)
    out = jax.eval_shape(lambda x, t, y: eval_apply(params, x, t, y, NO_DROPOUT_KEY), x, t, y)
    assert out.shape == (1, 8, 8, 3) and out.dtype == jnp.float32


def test_class_conditioning_changes_output(params, inputs):
    x, t, _ = inputs
    outs = [
        eval_apply(params, x, t, jnp.full((BATCH,), label, jnp.int32), NO_DROPOUT_KEY)
        for label in (0, 3, 10)
    ]  # 10 = the null label
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert float(jnp.max(jnp.abs(outs[a] - outs[b]))) > 1e-3


def test_timestep_changes_output(params, inputs):
    x, _, y = inputs
    out_a = eval_apply(params, x, jnp.zeros((BATCH,), jnp.int32), y, NO_DROPOUT_KEY)
    out_b = eval_apply(params, x, jnp.full((BATCH,), 900, jnp.int32), y, NO_DROPOUT_KEY)
    assert float(jnp.max(jnp.abs(out_a - out_b))) > 1e-3


@pytest.mark.parametrize("train", [False, True])
def test_examples_are_independent(params, inputs, train):
    """GroupNorm only: changing example j (image, timestep or label) leaves example i alone."""
    x, t, y = inputs
    apply = train_apply if train else eval_apply
    rng = jax.random.key(3)
    base = apply(params, x, t, y, rng)
    changed = apply(params, x.at[-1].set(-x[-1] * 3), t.at[-1].set(5), y.at[-1].set(7), rng)
    np.testing.assert_allclose(np.asarray(base[:-1]), np.asarray(changed[:-1]), atol=1e-5)
    assert float(jnp.max(jnp.abs(base[-1] - changed[-1]))) > 1e-3


def test_dropout_active_only_in_train(params, inputs):
    x, t, y = inputs
    eval_a = eval_apply(params, x, t, y, jax.random.key(4))
    eval_b = eval_apply(params, x, t, y, jax.random.key(5))
    np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
    train_a = train_apply(params, x, t, y, jax.random.key(4))
    train_a2 = train_apply(params, x, t, y, jax.random.key(4))
    train_b = train_apply(params, x, t, y, jax.random.key(5))
    np.testing.assert_array_equal(np.asarray(train_a), np.asarray(train_a2))
    assert float(jnp.max(jnp.abs(train_a - train_b))) > 1e-4
    assert float(jnp.max(jnp.abs(train_a - eval_a))) > 1e-4


def test_bfloat16_compute_close_to_float32(params, inputs):
    x, t, y = inputs
    bf16 = dataclasses.replace(TINY, dtype=jnp.bfloat16)
    out16 = jax.jit(make_apply_fn(bf16, train=False))(params, x, t, y, NO_DROPOUT_KEY)
    out32 = eval_apply(params, x, t, y, NO_DROPOUT_KEY)
    assert out16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert rel < 0.05


def test_label_arguments_are_checked(params, inputs):
    x, t, y = inputs
    with pytest.raises(ValueError, match="needs labels"):
        jax.eval_shape(lambda: UNet(TINY).apply({"params": params}, x, t, None, train=False))
    uncond = dataclasses.replace(TINY, num_classes=None)
    _output_struct(uncond)  # works without labels ...
    with pytest.raises(ValueError, match="unconditional"):  # ... and refuses labels
        jax.eval_shape(lambda: UNet(uncond).init(jax.random.key(0), x, t, y, train=False))
    with pytest.raises(ValueError, match="x must have shape"):
        jax.eval_shape(lambda: UNet(TINY).apply({"params": params}, x[:, :4], t, y, train=False))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(image_size=28, channel_mult=(1, 2, 2, 2)), "not divisible"),
        (dict(channel_mult=()), "must not be empty"),
        (dict(channel_mult=(1, 0)), "positive ints"),
        (dict(attention_resolutions=(3,)), "match no level"),
        (dict(num_heads=3), "does not divide"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
        (dict(num_res_blocks=0), "num_res_blocks must be a positive int"),
        (dict(base_channels=8.0), "base_channels must be a positive int"),
        (dict(num_classes=0), "num_classes must be a positive int"),
        (dict(dtype=jnp.int32), "dtype must be"),
        (dict(dtype="not-a-dtype"), "dtype"),
        (dict(resblock_updown="yes"), "must be a bool"),
    ],
)
def test_invalid_configs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **overrides)


def test_config_is_normalised_and_hashable():
    a = UNetConfig(
        image_size=8,
        channel_mult=[1, 2],
        attention_resolutions=[4],
        dtype="bfloat16",
        base_channels=8,
        num_heads=2,
    )
    b = UNetConfig(
        image_size=8,
        channel_mult=(1, 2),
        attention_resolutions=(4,),
        dtype=jnp.bfloat16,
        base_channels=8,
        num_heads=2,
    )
    assert a == b and hash(a) == hash(b)
    assert a.level_resolutions == (8, 4) and a.null_label is None


def test_presets_follow_overridden_image_size():
    assert set(PRESET_NAMES) == {"tiny", "cpu_small", "paper_cifar"}
    assert unet_preset("cpu_small").attention_resolutions == (7,)
    small16 = unet_preset("cpu_small", image_size=16)
    assert small16.attention_resolutions == (4,)
    assert count_parameters(small16) == count_parameters(unet_preset("cpu_small"))
    assert unet_preset("tiny", attention_resolutions=()).attention_resolutions == ()
    with pytest.raises(ValueError, match="unknown UNet preset"):
        unet_preset("huge")
    with pytest.raises(ValueError, match="unknown UNetConfig fields"):
        unet_preset("tiny", width=3)
