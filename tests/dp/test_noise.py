"""Properties of `dp_aggregate`: noise scale, independence, determinism, and the sigma = 0 limit."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdpdm.dp import DPAggregateState, clipped_grad_sum, dp_aggregate

SIGMA, CLIP, EBS = 1.3, 0.7, 32.0
# Two leaves of equal shape: identical per-leaf keys would show up as correlation between them.
SHAPES = {"a": (100, 100), "b": (100, 100), "c": (37,)}


def grad_sum_tree(seed, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), len(SHAPES))
    return {
        name: (5.0 * jax.random.normal(k, shape)).astype(dtype)
        for k, (name, shape) in zip(keys, SHAPES.items())
    }


def noise_of(transform, grads, count):
    """Noisy output minus the noiseless output, at step `count`, rescaled by EBS: the raw noise."""
    state = DPAggregateState(count=jnp.asarray(count, jnp.int32))
    noisy, _ = transform.update(grads, state)
    return {k: np.asarray(noisy[k]) * EBS - np.asarray(grads[k], np.float32) for k in grads}


TRANSFORM = dp_aggregate(clip_norm=CLIP, noise_multiplier=SIGMA, expected_batch_size=EBS, seed=3)


@pytest.mark.parametrize("seed", [0, 1])
def test_noise_std_matches_sigma_c_over_expected_batch_size(seed):
    grads = grad_sum_tree(seed)
    noisy, state = TRANSFORM.update(grads, DPAggregateState(jnp.asarray(seed, jnp.int32)))
    noiseless, _ = dp_aggregate(clip_norm=CLIP, noise_multiplier=0.0, expected_batch_size=EBS,
                                seed=3).update(grads, DPAggregateState(jnp.zeros((), jnp.int32)))
    assert int(state.count) == seed + 1
    diff = np.concatenate([np.ravel(noisy[k] - noiseless[k]) for k in grads])
    n = diff.size
    target = SIGMA * CLIP / EBS
    # Sample std of n iid normals: relative standard error 1/sqrt(2n) ~ 0.5%; allow 5 SE.
    assert abs(diff.std() / target - 1) < 5 / math.sqrt(2 * n)
    assert abs(diff.mean()) < 5 * target / math.sqrt(n)
    assert all(noisy[k].dtype == jnp.float32 for k in noisy)


def test_noise_is_independent_across_steps_and_coordinates():
    grads = grad_sum_tree(0)
    z0, z1 = noise_of(TRANSFORM, grads, 0), noise_of(TRANSFORM, grads, 1)
    n = z0["a"].size
    bound = 5 / math.sqrt(n)  # |sample correlation| of independent normals: SE 1/sqrt(n)
    corr = lambda x, y: np.corrcoef(np.ravel(x), np.ravel(y))[0, 1]
    assert abs(corr(z0["a"], z1["a"])) < bound  # step t vs step t + 1
    assert abs(corr(z0["a"], z0["b"])) < bound  # two leaves of the same shape
    flat_a = np.ravel(z0["a"])
    assert abs(corr(flat_a[:-1], flat_a[1:])) < bound  # neighbouring coordinates
    assert abs(corr(z0["a"][:, :50], z0["a"][:, 50:])) < 5 / math.sqrt(n / 2)


def test_same_seed_and_step_give_the_same_noise_and_resume_replays_it():
    grads = grad_sum_tree(1)
    twin = dp_aggregate(clip_norm=CLIP, noise_multiplier=SIGMA, expected_batch_size=EBS, seed=3)
    other_seed = dp_aggregate(clip_norm=CLIP, noise_multiplier=SIGMA, expected_batch_size=EBS,
                              seed=4)
    # Uninterrupted run: 4 updates from init.
    update = TRANSFORM.update
    state, outputs = TRANSFORM.init(grads), []
    for _ in range(4):
        out, state = update(grads, state)
        outputs.append(out)
    # Resumed run: a fresh transform whose state was restored (as from a checkpoint) at step 3.
    restored = DPAggregateState(count=jnp.asarray(np.asarray(3), jnp.int32))
    resumed, _ = twin.update(grads, restored)
    for k in grads:
        np.testing.assert_array_equal(resumed[k], outputs[3][k])
    assert not np.allclose(outputs[2]["a"], outputs[3]["a"])
    different, _ = other_seed.update(grads, restored)
    assert not np.allclose(different["a"], outputs[3]["a"])


def test_sigma_zero_and_infinite_clip_reproduce_the_plain_mean_gradient():

    def loss_fn(params, example, rng):
        del rng
        return jnp.square(jnp.tanh(example["x"] @ params["w"]) @ params["v"] - example["y"])

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(k1, (8, 16)), "v": jax.random.normal(k2, (16,))}
    batch = {"x": 3 * jax.random.normal(k3, (10, 8)), "y": jnp.arange(10.0)}
    optimizer = optax.chain(
        dp_aggregate(clip_norm=math.inf, noise_multiplier=0.0, expected_batch_size=10, seed=0),
        optax.sgd(0.1))
    grad_sum, stats = jax.jit(clipped_grad_sum(loss_fn, clip_norm=math.inf))(params, batch,
                                                                             jnp.ones(10, bool),
                                                                             jax.random.key(1))
    updates, _ = optimizer.update(grad_sum, optimizer.init(params), params)

    def mean_loss(p):
        return jnp.mean(jax.vmap(loss_fn, (None, 0, None))(p, batch, None))

    plain = jax.grad(mean_loss)(params)
    for k in params:
        assert np.all(np.isfinite(updates[k]))
        np.testing.assert_allclose(updates[k], -0.1 * plain[k], rtol=1e-5, atol=1e-6)
    assert int(stats.num_clipped) == 0


def test_frozen_leaves_get_no_noise_and_trainable_noise_is_unchanged():
    grads = grad_sum_tree(2, dtype=jnp.bfloat16)
    frozen = dp_aggregate(clip_norm=CLIP, noise_multiplier=SIGMA, expected_batch_size=EBS, seed=3,
                          trainable={"a": True, "b": False, "c": True})
    masked = noise_of(frozen, grads, 5)
    full = noise_of(TRANSFORM, grads, 5)
    np.testing.assert_array_equal(masked["b"] + np.asarray(grads["b"], np.float32), 0.0)
    np.testing.assert_array_equal(masked["a"], full["a"])  # keys do not depend on the mask
    by_regex = dp_aggregate(clip_norm=CLIP, noise_multiplier=SIGMA, expected_batch_size=EBS, seed=3,
                            trainable="^(a|c)$")
    np.testing.assert_array_equal(noise_of(by_regex, grads, 5)["c"], masked["c"])


def test_refuses_to_run_inside_optax_multi_transform_freezing():
    """optax.multi_transform hands the DP group a tree with MaskedNode for the frozen leaves, whose
    sizes are unknown: the noise layout would shift with the frozen set. `trainable=` freezes."""
    grads = grad_sum_tree(0)
    labels = {"a": "train", "b": "freeze", "c": "train"}
    optimizer = optax.multi_transform({"train": TRANSFORM, "freeze": optax.set_to_zero()}, labels)
    with pytest.raises(ValueError, match="MaskedNode.*trainable="):
        optimizer.update(grads, optimizer.init(grads))


def test_chains_with_adam_under_jit():
    grads = grad_sum_tree(0)
    optimizer = optax.chain(TRANSFORM, optax.adam(3e-4))
    params = jax.tree.map(jnp.zeros_like, grads)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state):
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = step(params, state)
    params, state = step(params, state)
    assert int(state[0].count) == 2
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(params))


@pytest.mark.parametrize("kwargs, match", [
    (dict(clip_norm=0.0, noise_multiplier=1.0), "clip_norm"),
    (dict(clip_norm=1.0, noise_multiplier=-0.5), "noise_multiplier"),
    (dict(clip_norm=math.inf, noise_multiplier=1.0), "finite clip_norm"),
    (dict(clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=0), "expected_batch_size"),
])
def test_bad_arguments_raise(kwargs, match):
    kwargs = {"expected_batch_size": 8, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        dp_aggregate(**kwargs)
