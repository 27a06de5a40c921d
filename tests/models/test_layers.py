"""Tests of jaxdpdm.models.layers: the GroupNorm group rule and values, the timestep embedding,
the shapes of the resampling blocks and the two convolution implementations."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdpdm.models.layers import (
    CONV_IMPLS,
    AttentionBlock,
    Conv,
    Downsample,
    GroupNorm,
    ResBlock,
    Upsample,
    conv_nhwc,
    conv_patch_matmul_grad,
    group_norm,
    group_norm_groups,
    timestep_embedding,
)


@pytest.mark.parametrize("channels", [1, 3, 8, 12, 20, 40, 48, 64, 96, 192, 384, 100, 37])
def test_group_count_is_largest_divisor_at_most_32(channels):
    groups = group_norm_groups(channels)
    assert channels % groups == 0 and 1 <= groups <= min(32, channels)
    assert not any(channels % g == 0 for g in range(groups + 1, min(32, channels) + 1))


def test_group_count_examples_and_errors():
    assert [group_norm_groups(c) for c in (8, 40, 64, 192)] == [8, 20, 32, 32]
    with pytest.raises(ValueError):
        group_norm_groups(0)


def test_group_norm_is_per_example():
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 8)) * jnp.arange(1, 4)[:, None, None, None]
    out, _ = jax.jit(GroupNorm().init_with_output)(jax.random.key(1), x)
    # Each example is normalised with its own statistics: zero mean / unit variance per group.
    per_group = np.asarray(out).reshape(3, 16, 8)  # 8 channels -> 8 groups of one channel
    np.testing.assert_allclose(per_group.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(per_group.var(axis=1), 1.0, atol=1e-3)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", [(3, 5, 5, 48), (2, 4, 4, 8), (2, 7, 64), (1, 3, 3, 40)])
def test_group_norm_matches_flax_values_and_gradients(shape, seed):
    """Same parameters (paths, shapes, init) as flax's nn.GroupNorm inside, and the same values,
    batched gradients and per-example (vmap) gradients, on random inputs and parameters."""
    keys = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(keys[0], shape) * jax.random.uniform(keys[1], (), minval=0.1,
                                                               maxval=5.0) + seed
    ours, theirs = GroupNorm(), nn.GroupNorm(num_groups=group_norm_groups(shape[-1]),
                                             epsilon=1e-5, name="norm")
    params = ours.init(keys[2], x)["params"]
    assert jax.tree.map(jnp.shape, params["norm"]) == jax.tree.map(
        jnp.shape, theirs.init(keys[2], x)["params"])
    # Random scale and bias, so their gradients are not those of the initial ones.
    params = {"norm": {"scale": 1 + 0.3 * jax.random.normal(keys[3], shape[-1:]),
                       "bias": 0.3 * jax.random.normal(keys[4], shape[-1:])}}
    cotangent = jax.random.normal(keys[5], shape)

    def loss(module, p, x, ct):
        return jnp.vdot(module.apply({"params": p}, x), ct)

    def loss_theirs(p, x, ct):
        return loss(theirs, p["norm"], x, ct)

    np.testing.assert_allclose(ours.apply({"params": params}, x),
                               theirs.apply({"params": params["norm"]}, x), atol=2e-5, rtol=1e-5)
    batched = (jax.grad(functools.partial(loss, ours), (0, 1))(params, x, cotangent),
               jax.grad(loss_theirs, (0, 1))(params, x, cotangent))
    per_example = [
        jax.vmap(lambda xi, ci, f=f: jax.grad(f, (0, 1))(params, xi[None], ci[None]))(x, cotangent)
        for f in (functools.partial(loss, ours), loss_theirs)
    ]
    for got, want in (batched, per_example):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, atol=5e-5 * (1 + float(jnp.max(jnp.abs(b)))))


def test_group_norm_dtype_and_errors():
    x = (3 * jax.random.normal(jax.random.key(0), (2, 4, 4, 8)) + 1).astype(jnp.bfloat16)
    params = {"scale": jnp.ones(8) * 1.5, "bias": jnp.ones(8) * 0.1}
    out = GroupNorm(jnp.bfloat16).apply({"params": {"norm": params}}, x)
    flax_out = nn.GroupNorm(num_groups=8, epsilon=1e-5, dtype=jnp.bfloat16,
                            param_dtype=jnp.float32).apply({"params": params}, x)
    assert out.dtype == flax_out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), flax_out.astype(jnp.float32), atol=1e-2)
    assert group_norm(x, jnp.ones(8), jnp.zeros(8), 4).dtype == jnp.bfloat16
    assert group_norm(x, jnp.ones(8), jnp.zeros(8), 4, dtype=jnp.float32).dtype == jnp.float32
    with pytest.raises(ValueError, match="do not divide"):
        group_norm(x, jnp.ones(8), jnp.zeros(8), 3)


def test_timestep_embedding_shape_and_values():
    t = jnp.array([0, 1, 999])
    emb = timestep_embedding(t, 16)
    assert emb.shape == (3, 16) and emb.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(emb[0]), np.r_[np.ones(8), np.zeros(8)], atol=1e-7)
    assert timestep_embedding(jnp.array([0.5, 2.25]), 7).shape == (2, 7)  # odd width, real t
    # Distinct timesteps get distinct embeddings.
    assert (float(jnp.min(jnp.linalg.norm(emb[:, None] - emb[None], axis=-1) + 10 * jnp.eye(3)))
            > 0.1)
    with pytest.raises(ValueError):
        timestep_embedding(jnp.zeros((2, 2)), 8)


@pytest.mark.parametrize(
    "module,expected",
    [
        (Downsample(use_conv=True), (2, 3, 3, 4)),
        (Downsample(use_conv=False), (2, 3, 3, 4)),
        (Upsample(use_conv=True), (2, 12, 12, 4)),
        (Upsample(use_conv=False), (2, 12, 12, 4)),
    ],
)
def test_resampling_shapes(module, expected):
    x = jnp.ones((2, 6, 6, 4))
    out = jax.eval_shape(lambda: module.init_with_output(jax.random.key(0), x)[0])
    assert out.shape == expected


@pytest.mark.parametrize("up,down,size", [(False, False, 6), (True, False, 12), (False, True, 3)])
def test_resblock_shapes(up, down, size):
    x, emb = jnp.ones((2, 6, 6, 4)), jnp.ones((2, 16))
    block = ResBlock(out_channels=8, dropout=0.1, up=up, down=down)
    out = jax.eval_shape(lambda: block.init_with_output(jax.random.key(0), x, emb, train=False)[0])
    assert out.shape == (2, size, size, 8)


def test_attention_heads_must_divide_channels():
    x = jnp.ones((2, 4, 4, 8))
    with pytest.raises(ValueError, match="does not divide"):
        jax.eval_shape(lambda: AttentionBlock(num_heads=3).init(jax.random.key(1), x))


@pytest.mark.parametrize("kernel_size,strides", [(3, 1), (3, 2), (1, 1)])
def test_patch_matmul_conv_has_xla_values_and_gradients(kernel_size, strides):
    """Per-example (vmap of grad) and batched gradients of both conv implementations agree."""
    x = jax.random.normal(jax.random.key(0), (3, 2, 6, 6, 4))  # [examples, K, H, W, Cin]
    kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, 4, 5))
    padding = (kernel_size - 1) // 2

    def grads(conv):

        def loss(w, xe):
            return jnp.sum(jnp.sin(conv(xe, w, strides, padding)))

        per_example = jax.vmap(jax.grad(loss, argnums=(0, 1)), (None, 0))(kernel, x)
        batched = jax.grad(loss, argnums=(0, 1))(kernel, x.reshape((6, 6, 6, 4)))
        return conv(x[0], kernel, strides, padding), per_example, batched

    expected, got = grads(conv_nhwc), grads(conv_patch_matmul_grad)
    np.testing.assert_array_equal(got[0], expected[0])
    for a, b in zip(jax.tree.leaves(got[1:]), jax.tree.leaves(expected[1:])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_conv_impls_share_parameters_and_reject_unknown_impl():
    x = jnp.ones((2, 8, 8, 3))
    shapes = [
        jax.tree.map(jnp.shape,
                     Conv(4, impl=impl).init(jax.random.key(0), x)) for impl in CONV_IMPLS
    ]
    assert all(s == shapes[0] for s in shapes)
    assert shapes[0] == {"params": {"kernel": (3, 3, 3, 4), "bias": (4,)}}
    with pytest.raises(ValueError, match="conv impl"):
        Conv(4, impl="im2col").init(jax.random.key(0), x)
