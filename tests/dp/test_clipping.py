"""Properties of `clipped_grad_sum` over random MLPs and inputs (seeds play hypothesis' role)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdpdm.dp import as_typed_key, clipped_grad_sum, trainable_mask

DIM, HIDDEN, B = 8, 16, 12
CLIP = 0.5


def init_mlp(seed, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        "dense1": {
            "kernel": (jax.random.normal(k1, (DIM, HIDDEN)) / 3).astype(dtype),
            "bias": (0.1 * jax.random.normal(k2, (HIDDEN,))).astype(dtype)
        }, "dense2": {"kernel": (jax.random.normal(k3, (HIDDEN,)) / 4).astype(dtype)}
    }


def loss_fn(params, example, rng):
    """Loss of ONE example: scale * squared error of a 2-layer MLP, with per-example input noise."""
    x = example["x"] + 0.01 * jax.random.normal(rng, example["x"].shape)
    h = jnp.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
    out = h @ params["dense2"]["kernel"]
    return example["scale"] * jnp.square(out - example["y"]).astype(jnp.float32)


def make_batch(seed, scales=None, size=B):
    rng = np.random.default_rng(seed)
    if scales is None:
        scales = 10.0**rng.uniform(-2, 2, size)
    return {
        "x": rng.normal(size=(size, DIM)).astype(np.float32),
        "y": rng.normal(size=size).astype(np.float32), "scale": np.asarray(scales, np.float32),
        "index": rng.permutation(1000)[:size].astype(np.int32)
    }


def flat(tree):
    return np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(tree)])


def tree_norm(tree):
    """Global L2 norm in float64 (no under/overflow for the extreme scales used here)."""
    return float(np.linalg.norm(flat(tree).astype(np.float64)))


KEY = jax.random.key(7)
# One compiled function per shape and configuration (compiles dominate the runtime here).
GRAD_SUM = jax.jit(clipped_grad_sum(loss_fn, clip_norm=CLIP))
MICROBATCHED = {
    m: jax.jit(clipped_grad_sum(loss_fn, clip_norm=CLIP, microbatch_size=m)) for m in (1, 4)
}


@jax.jit
def per_example_clipped(params, batch):
    """Per-example clipped gradients [B, ...] and stats via the public API (a vmapped batch of
    one), with the unclipped f32 gradients at scale 1 as reference directions."""

    def one(example):
        single = jax.tree.map(lambda x: x[None], example)
        return clipped_grad_sum(loss_fn, clip_norm=CLIP)(params, single, jnp.ones(1, bool), KEY)

    keys = jax.vmap(jax.random.fold_in, (None, 0))(KEY, batch["index"])
    unit = dict(batch, scale=jnp.ones_like(batch["scale"]))
    reference = jax.vmap(jax.grad(loss_fn), (None, 0, 0))(params, unit, keys)
    return jax.vmap(one)(batch) + (reference,)


EXTREME_SCALES = [1e30, 1e-30, 0.0, 1.0, 1e3, 1e-3, 1e20, 1e-20, 5.0, 0.2, 1e6, 1e-6]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_clipped_gradient_has_norm_at_most_c(seed, dtype):
    params = init_mlp(seed, dtype)
    batch = make_batch(seed, scales=EXTREME_SCALES)
    grads, stats, reference = per_example_clipped(params, batch)
    for i, scale in enumerate(EXTREME_SCALES):
        g = jax.tree.map(lambda x: x[i], grads)
        norm = tree_norm(g)
        assert norm <= CLIP * (1 + 1e-6), (scale, norm)
        assert jax.tree.all(jax.tree.map(lambda x: x.dtype == jnp.float32, g))
        pre_clip = float(stats.norms[i, 0])
        # Clipping keeps min(norm, C): huge gradients clip to C (not to 0 by overflow), tiny ones
        # keep their (nonzero) norm rather than flushing to 0 by underflow.
        expected = min(pre_clip, CLIP)
        assert norm == pytest.approx(expected, rel=1e-4, abs=0.0), (scale, pre_clip)
        if scale == 0.0:
            assert norm == 0.0
            continue
        ref = flat(jax.tree.map(lambda x: x[i], reference))
        assert pre_clip == pytest.approx(scale * np.linalg.norm(ref), rel=2e-2)
        g64, ref = flat(g).astype(np.float64), ref.astype(np.float64)
        cosine = g64 @ ref / (np.linalg.norm(g64) * np.linalg.norm(ref))
        assert cosine > 1 - 1e-3, (scale, cosine)  # clipping rescales, never rotates
    assert int(stats.num_nonfinite.sum()) == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_removing_one_example_changes_sum_by_at_most_c(seed):
    params = init_mlp(seed)
    batch = make_batch(seed)
    full, _ = GRAD_SUM(params, batch, np.ones(B, bool), KEY)
    clipped, _, _ = per_example_clipped(params, batch)
    for i in range(B):
        without_i = np.arange(B) != i
        diff = jax.tree.map(jnp.subtract, full, GRAD_SUM(params, batch, without_i, KEY)[0])
        assert tree_norm(diff) <= CLIP * (1 + 1e-5)
        # The change is exactly that example's clipped gradient (the sum is a plain sum).
        np.testing.assert_allclose(flat(diff), flat(jax.tree.map(lambda c: c[i], clipped)),
                                   atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_padding_is_zero_and_microbatching_changes_nothing(seed):
    params = init_mlp(seed)
    batch = make_batch(seed)
    mask = np.random.default_rng(seed).permutation(B) < 8  # 4 padding rows, interleaved
    clipped, clip_stats, _ = per_example_clipped(params, batch)
    expected = flat(jax.tree.map(lambda c: c[mask].sum(0), clipped))
    # Padding rows hold garbage (NaN inputs, huge scales): only the mask may matter.
    padded = {k: v.copy() for k, v in batch.items()}
    padded["x"][~mask] = np.nan
    padded["scale"][~mask] = 1e38
    for fn in (GRAD_SUM, MICROBATCHED[1], MICROBATCHED[4]):
        total, stats = fn(params, padded, mask, KEY)
        np.testing.assert_allclose(flat(total), expected, rtol=1e-5, atol=1e-6)
        assert np.all(np.asarray(stats.norms)[~mask] == 0)
        assert np.all(np.asarray(stats.losses)[~mask] == 0)
        np.testing.assert_allclose(
            np.asarray(stats.norms)[mask],
            np.asarray(clip_stats.norms)[mask, 0], rtol=1e-5)
        assert int(stats.num_nonfinite) == 0
        assert int(stats.num_clipped) == int(np.sum(np.asarray(clip_stats.norms)[mask] > CLIP))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nonfinite_gradient_is_zeroed_and_counted(seed, bad):
    params = init_mlp(seed)
    batch = make_batch(seed)
    broken = np.random.default_rng(seed).choice(B, size=3, replace=False)
    poisoned = {k: v.copy() for k, v in batch.items()}
    if bad == "nan":
        poisoned["x"][broken, 0] = np.nan
    else:
        poisoned["scale"][broken] = np.inf
    mask = np.ones(B, bool)
    total, stats = GRAD_SUM(params, poisoned, mask, KEY)
    healthy = mask.copy()
    healthy[broken] = False
    expected, _ = GRAD_SUM(params, batch, healthy, KEY)
    assert int(stats.num_nonfinite) == 3
    assert np.all(np.isfinite(flat(total)))
    np.testing.assert_allclose(flat(total), flat(expected), rtol=1e-6, atol=1e-7)


def test_trainable_subset_is_not_differentiated():
    params = init_mlp(0)
    batch = make_batch(0)
    mask = np.ones(B, bool)
    full_inf = jax.jit(clipped_grad_sum(loss_fn, clip_norm=math.inf))(params, batch, mask, KEY)[0]
    pattern = "dense2/"
    as_tree = trainable_mask(params, pattern)
    assert as_tree == {"dense1": {"kernel": False, "bias": False}, "dense2": {"kernel": True}}
    sub_inf = jax.jit(clipped_grad_sum(loss_fn, clip_norm=math.inf,
                                       trainable=pattern))(params, batch, mask, KEY)[0]
    assert not np.any(flat(sub_inf["dense1"]))  # frozen leaves: zeros
    np.testing.assert_allclose(sub_inf["dense2"]["kernel"], full_inf["dense2"]["kernel"], rtol=1e-6)

    def count_dots(trainable):
        fn = clipped_grad_sum(loss_fn, clip_norm=CLIP, trainable=trainable)
        return str(jax.make_jaxpr(fn)(params, batch, mask, KEY)).count("dot_general")

    # Freezing the first layer removes its weight-gradient (and the backprop into it); a regex
    # and the equivalent bool tree give the same program.
    assert count_dots(pattern) < count_dots(None)
    assert count_dots(as_tree) == count_dots(pattern)


def test_bad_arguments_raise():
    params, batch = init_mlp(0), make_batch(0)
    with pytest.raises(ValueError, match="clip_norm"):
        clipped_grad_sum(loss_fn, clip_norm=0.0)
    with pytest.raises(ValueError, match="microbatch_size"):
        clipped_grad_sum(loss_fn, clip_norm=1.0, microbatch_size=0)
    with pytest.raises(ValueError, match="multiple"):
        clipped_grad_sum(loss_fn, clip_norm=1.0, microbatch_size=5)(params, batch, np.ones(B, bool),
                                                                    KEY)
    with pytest.raises(ValueError, match="PRNG key"):
        GRAD_SUM(params, batch, np.ones(B, bool), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="raw key data"):
        GRAD_SUM(params, batch, np.ones(B, bool), jnp.zeros(3, jnp.uint32))
    with pytest.raises(ValueError, match="bool"):
        GRAD_SUM(params, batch, np.ones(B, np.int32), KEY)
    with pytest.raises(ValueError, match="selects no parameter"):
        trainable_mask(params, "no_such_layer")


def test_raw_uint32_keys_give_exactly_the_typed_key_result():
    """`jax.random.PRNGKey(s)` (raw uint32[2]) and `jax.random.key(s)` draw the same bits."""
    params, batch = init_mlp(3), make_batch(3)
    mask = np.arange(B) < B - 2
    grad_fn = jax.jit(clipped_grad_sum(loss_fn, clip_norm=CLIP, microbatch_size=4))
    typed_sum, typed_stats = grad_fn(params, batch, mask, jax.random.key(7))
    raw_sum, raw_stats = grad_fn(params, batch, mask, jax.random.PRNGKey(7))
    np.testing.assert_array_equal(flat(raw_sum), flat(typed_sum))
    np.testing.assert_array_equal(raw_stats.norms, typed_stats.norms)
    # Per-row keys: raw uint32[B, 2] as well as typed key[B].
    rows = jax.random.split(jax.random.key(8), B)
    by_typed_rows, _ = grad_fn(params, batch, mask, rows)
    by_raw_rows, _ = grad_fn(params, batch, mask, jax.random.key_data(rows))
    np.testing.assert_array_equal(flat(by_raw_rows), flat(by_typed_rows))
    assert not np.array_equal(flat(by_typed_rows), flat(typed_sum))  # the keys do matter
    assert as_typed_key(jax.random.PRNGKey(7)).dtype == jax.random.key(7).dtype
