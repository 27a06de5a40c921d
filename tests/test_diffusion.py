"""Tests of jaxdpdm.diffusion: schedules, forward process and posterior, the timestep
mixture, and the per-example loss (augmentation multiplicity, flips, label dropout)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxdpdm.diffusion import (
    TimestepDistribution,
    draw_training_inputs,
    make_schedule,
    per_example_loss,
    predict_eps_from_x0,
    predict_x0_from_eps,
    q_posterior,
    q_sample,
)
from jaxdpdm.models.unet import UNetConfig, make_apply_fn, param_shapes

T = 1000
LINEAR = make_schedule("linear", T)
UNIFORM = TimestepDistribution.uniform(T)
PAPER_LIKE = TimestepDistribution(((0, 200), (200, 800), (800, 1000)), (1.0, 7.0, 2.0))


def _image(shape=(8, 8, 3), seed=0):
    """An image in [-1, 1] that is not left-right symmetric (so flips are visible)."""
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape), jnp.float32)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_properties(kind):
    s = make_schedule(kind, T)
    acp = np.asarray(s.alphas_cumprod, np.float64)
    assert acp.shape == (T,) and s.num_timesteps == T and s.kind == kind
    assert np.all((acp > 0) & (acp < 1)) and np.all(np.diff(acp) < 0)
    assert np.all((np.asarray(s.betas) > 0) & (np.asarray(s.betas) < 1))
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod_prev)[1:], acp[:-1])
    assert float(s.alphas_cumprod_prev[0]) == 1.0
    np.testing.assert_allclose(
        np.asarray(s.sqrt_alphas_cumprod)**2 + np.asarray(s.sqrt_one_minus_alphas_cumprod)**2,
        1.0,
        rtol=1e-6,
    )
    assert float(s.posterior_variance[0]) == 0.0 and np.all(np.asarray(s.posterior_variance) >= 0)
    assert np.all(np.isfinite(np.asarray(s.posterior_log_variance_clipped)))
    assert acp[0] >= 0.9998 and acp[-1] < 1e-4  # almost clean at t=0, almost pure noise at T-1


def test_linear_endpoints_and_cosine_formula():
    np.testing.assert_allclose(float(LINEAR.betas[0]), 1e-4, rtol=1e-6)
    np.testing.assert_allclose(float(LINEAR.betas[-1]), 0.02, rtol=1e-6)
    cosine = make_schedule("cosine", T)
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2)**2
    t = np.array([0, 100, 500, 900])
    np.testing.assert_allclose(
        np.asarray(cosine.alphas_cumprod)[t],
        f((t + 1) / T) / f(0), rtol=1e-4)
    # Endpoint: abar -> 0 at t = T - 1, kept positive only by the beta cap 0.999.
    assert 0 < float(cosine.alphas_cumprod[-1]) < 1e-7
    assert float(cosine.betas[-1]) == pytest.approx(0.999)


def test_make_schedule_errors():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("quadratic")
    with pytest.raises(ValueError, match=">= 2"):
        make_schedule("linear", 1)


def test_q_sample_statistics():
    """x_t for a constant image has mean sqrt(abar) x0 and variance 1 - abar (4-sigma bounds)."""
    t = jnp.array([0, 250, 999])
    n = 20_000
    x0 = jnp.full((3, n), 0.7)
    x_t = np.asarray(q_sample(LINEAR, x0, t, jax.random.normal(jax.random.key(0), (3, n))))
    acp = np.asarray(LINEAR.alphas_cumprod)[np.asarray(t)]
    var = 1 - acp
    assert np.all(np.abs(x_t.mean(1) - np.sqrt(acp) * 0.7) < 4 * np.sqrt(var / n))
    assert np.all(np.abs(x_t.var(1) / var - 1) < 4 * np.sqrt(2 / n))


def test_predictions_invert_q_sample():
    x0 = jax.random.uniform(jax.random.key(1), (3, 8, 8, 3), minval=-1, maxval=1)
    eps = jax.random.normal(jax.random.key(2), x0.shape)
    t = jnp.array([1, 300, 900])

    @jax.jit
    def round_trip(x0, eps, t):
        x_t = q_sample(LINEAR, x0, t, eps)
        return predict_x0_from_eps(LINEAR, x_t, t, eps), predict_eps_from_x0(LINEAR, x_t, t, x0)

    x0_hat, eps_hat = round_trip(x0, eps, t)
    np.testing.assert_allclose(x0_hat, x0, atol=2e-3)
    np.testing.assert_allclose(eps_hat, eps, atol=2e-3)
    with pytest.raises(ValueError, match="integers"):
        jax.eval_shape(lambda: q_sample(LINEAR, x0, t.astype(jnp.float32), eps))


def test_q_posterior_matches_bayes_rule():
    """Posterior of x_{t-1} from prior N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) and likelihood
    N(sqrt(alpha_t) x_{t-1}, beta_t), computed independently in float64."""
    t = np.array([1, 10, 500, 999])
    x0 = np.linspace(-1, 1, 4)[:, None, None, None] * np.ones((4, 2, 2, 1))
    x_t = np.random.default_rng(0).standard_normal((4, 2, 2, 1))
    mean, var, log_var = q_posterior(LINEAR, jnp.asarray(x0, jnp.float32),
                                     jnp.asarray(x_t, jnp.float32), jnp.asarray(t))
    betas = np.linspace(1e-4, 0.02, T)
    acp = np.cumprod(1 - betas)
    prev, beta = acp[t - 1][:, None, None, None], betas[t][:, None, None, None]
    precision = 1 / (1 - prev) + (1 - beta) / beta
    expected_mean = (np.sqrt(prev) * x0 / (1 - prev) + np.sqrt(1 - beta) * x_t / beta) / precision
    assert var.shape == (4, 1, 1, 1) and mean.shape == x0.shape
    np.testing.assert_allclose(var, 1 / precision, rtol=1e-4)
    np.testing.assert_allclose(log_var, np.log(1 / precision), rtol=1e-4)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-4, atol=1e-5)
    mean0, var0, _ = q_posterior(LINEAR, jnp.asarray(x0, jnp.float32),
                                 jnp.asarray(x_t, jnp.float32), jnp.zeros(4, jnp.int32))
    np.testing.assert_allclose(mean0, x0, atol=1e-6)
    np.testing.assert_array_equal(var0, 0.0)


def test_timestep_mixture_frequencies():
    """Per-range frequencies within 4 standard errors of the weights, and the per-timestep
    counts pass a chi-square goodness-of-fit test against `probabilities` at level 1e-4 (fixed
    seed, so the test is deterministic)."""
    n = 200_000
    t = np.asarray(PAPER_LIKE.sample(jax.random.key(0), (n,)))
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() < T
    freq = np.histogram(t, [0, 200, 800, 1000])[0] / n
    weights = np.array([0.1, 0.7, 0.2])
    assert np.all(np.abs(freq - weights) < 4 * np.sqrt(weights * (1 - weights) / n))
    probs = PAPER_LIKE.probabilities(T)
    assert probs.sum() == pytest.approx(1.0)
    assert stats.chisquare(np.bincount(t, minlength=T), probs * n).pvalue > 1e-4


def test_zero_weight_range_is_never_sampled():
    dist = TimestepDistribution(((0, 10), (10, 20)), (0.0, 3.0))
    assert dist.weights == (0.0, 1.0)
    t = np.asarray(dist.sample(jax.random.key(1), (5000,)))
    assert t.min() >= 10 and t.max() < 20 and len(np.unique(t)) == 10


@pytest.mark.parametrize(
    "ranges,weights,message",
    [
        (((0, 10), (5, 20)), (1, 1), "overlap"),
        (((0, 0),), (1,), "lo < hi"),
        (((-1, 5),), (1,), "lo < hi"),
        (((0, 10),), (1, 2), "1 ranges but 2 weights"),
        (((0, 10), (10, 20)), (0, 0), "not all be zero"),
        (((0, 10), (10, 20)), (1, -1), ">= 0"),
        (((0, 10),), (float("nan"),), ">= 0"),
        ((), (), "at least one range"),
        ((("a", 2),), (1,), "int pairs"),
        (((0.5, 2),), (1,), "int pairs"),
    ],
)
def test_timestep_distribution_validation(ranges, weights, message):
    with pytest.raises(ValueError, match=message):
        TimestepDistribution(ranges, weights)


def test_timestep_distribution_is_hashable_and_checks_t():
    a = TimestepDistribution([[0, 200], [200, 1000]], [1, 3])
    b = TimestepDistribution(((0, 200), (200, 1000)), (0.25, 0.75))
    assert a == b and hash(a) == hash(b)
    sample = jax.jit(lambda dist, key: dist.sample(key, (4,)), static_argnums=0)
    assert sample(a, jax.random.key(0)).shape == (4,)
    with pytest.raises(ValueError, match="exceeds"):
        TimestepDistribution(((0, 1001),), (1,)).probabilities(T)


def _zero_model(params, x, t, y, rng):
    """A stand-in model that predicts zero noise: the loss is then mean(noise^2)."""
    del params, t, y, rng
    return jnp.zeros_like(x)


# Jitted (options static): eager dispatch of the random ops costs more than one compile.
LOSS = jax.jit(
    functools.partial(per_example_loss, _zero_model, None, schedule=LINEAR,
                      timestep_dist=PAPER_LIKE),
    static_argnames=("augmult", "random_flip"),
)
DRAW = jax.jit(
    functools.partial(draw_training_inputs, LINEAR, timestep_dist=UNIFORM),
    static_argnames=("augmult", "random_flip", "label_dropout", "null_label"),
)


def test_loss_is_finite_deterministic_and_depends_on_rng():
    example = {"image": _image(), "label": jnp.int32(3), "index": jnp.int32(0)}
    a = LOSS(example, jax.random.key(0), augmult=4, random_flip=True)
    b = LOSS(example, jax.random.key(0), augmult=4, random_flip=True)
    c = LOSS(example, jax.random.key(1), augmult=4, random_flip=True)
    assert a.shape == () and a.dtype == jnp.float32 and bool(jnp.isfinite(a))
    assert float(a) == float(b) and float(a) != float(c)
    assert 0.7 < float(a) < 1.3  # mean of squares of 4*192 standard normals


@pytest.mark.parametrize("augmult", [1, 3])
def test_model_sees_k_draws(augmult):
    seen = {}

    def recording_model(params, x, t, y, rng):
        seen.update(x=x.shape, t=t.shape, y=y.shape)
        return jnp.zeros_like(x)

    example = {"image": _image(), "label": jnp.int32(2)}
    loss = jax.eval_shape(lambda: per_example_loss(
        recording_model,
        None,
        example,
        jax.random.key(0),
        schedule=LINEAR,
        timestep_dist=UNIFORM,
        augmult=augmult,
    ))
    assert loss.shape == ()
    assert seen == {"x": (augmult, 8, 8, 3), "t": (augmult,), "y": (augmult,)}


def test_draws_match_q_sample_and_flip_per_draw():
    image = _image()
    draws = jax.tree.map(np.asarray,
                         DRAW({"image": image}, jax.random.key(3), augmult=64, random_flip=True))
    image = np.asarray(image)
    assert 0 < draws.flipped.sum() < 64  # flips are drawn per draw, not once per example
    expected = np.where(draws.flipped[:, None, None, None], image[:, ::-1], image)
    np.testing.assert_array_equal(draws.x0, expected)
    np.testing.assert_allclose(draws.x_t, q_sample(LINEAR, draws.x0, draws.t, draws.noise),
                               atol=1e-6)
    assert draws.label is None and len(np.unique(draws.t)) > 1


def test_label_dropout_frequency():
    """Fraction of null labels over 4000 examples within 4 standard errors of p = 0.3."""
    p, n, null = 0.3, 4000, 10
    example = {"image": jnp.zeros((2, 2, 1)), "label": jnp.int32(4)}
    draw = jax.jit(
        jax.vmap(lambda key: DRAW(example, key, augmult=2, label_dropout=p, null_label=null)))
    draws = draw(jax.random.split(jax.random.key(0), n))
    labels = np.asarray(draws.label)
    dropped = np.asarray(draws.label_dropped)
    assert np.all(labels[:, 0] == labels[:, 1])  # once per example, shared by its K draws
    np.testing.assert_array_equal(labels[:, 0] == null, dropped)
    assert set(np.unique(labels)) == {4, null}
    assert abs(dropped.mean() - p) < 4 * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(augmult=0), "augmult"),
        (dict(label_dropout=1.5), "label_dropout"),
        (dict(label_dropout=0.1), "null_label"),
        (dict(timestep_dist=TimestepDistribution(((0, 2000),), (1,))), "exceeds"),
    ],
)
def test_loss_argument_errors(kwargs, message):
    example = {"image": _image(), "label": jnp.int32(1)}
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda: per_example_loss(
            _zero_model,
            None,
            example,
            jax.random.key(0),
            **{"schedule": LINEAR, "timestep_dist": UNIFORM, **kwargs},
        ))


def test_per_example_gradients_through_a_unet():
    """The DP use: vmap(grad(loss)) over examples with a (very small) class-conditional UNet,
    dropout, label dropout, flips and K = 2; every per-example gradient is finite, nonzero and
    differs between examples."""
    config = UNetConfig(
        image_size=8,
        in_channels=1,
        base_channels=4,
        channel_mult=(1,),
        num_res_blocks=1,
        num_heads=1,
        dropout=0.1,
        num_classes=3,
    )
    # Host-drawn random parameters: compiling `init_params` would double this test's time, and
    # zero-initialised output layers would make most gradients vanish.
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda leaf: jnp.asarray(0.3 * rng.standard_normal(leaf.shape), jnp.float32),
        param_shapes(config),
    )
    loss = functools.partial(
        per_example_loss,
        make_apply_fn(config, train=True),
        schedule=LINEAR,
        timestep_dist=PAPER_LIKE,
        augmult=2,
        random_flip=True,
        label_dropout=0.2,
        null_label=config.null_label,
    )
    batch = {
        "image": jnp.stack([_image((8, 8, 1), seed=s) for s in range(3)]),
        "label": jnp.array([0, 1, 2], jnp.int32),
        "index": jnp.arange(3, dtype=jnp.int32),
    }
    # An RBG step key: the same typed-key code path as threefry, but XLA:CPU compiles its
    # random ops about twice as fast, which halves this test's time.
    step_key = jax.random.key(7, impl="rbg")
    per_example = jax.jit(
        jax.vmap(lambda ex: jax.value_and_grad(loss)
                 (params, ex, jax.random.fold_in(step_key, ex["index"]))))
    losses, grads = per_example(batch)
    assert losses.shape == (3,) and bool(jnp.all(jnp.isfinite(losses)))
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(3, -1)**2, axis=1) for g in jax.tree.leaves(grads)))
    assert bool(jnp.all(jnp.isfinite(norms))) and bool(jnp.all(norms > 0))
    assert len(np.unique(np.asarray(norms))) == 3
