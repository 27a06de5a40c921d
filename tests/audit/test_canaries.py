"""Canary design, secret inclusion bits, routing of Poisson draws, Dirac sums, the release tap."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdpdm.audit import run as audit_run
from jaxdpdm.audit.canaries import (CanaryInjector, CanarySet, draw_canaries, released_scores)
from jaxdpdm.dp import dp_aggregate
from jaxdpdm.experiment import build_experiment


def _draw(secret, **kw):
    args = dict(image_shape=(8, 8, 1), num_classes=10, num_trainable=5000)
    args.update(kw)
    return draw_canaries("both", 400, secret_seed=secret, **args)


def test_inclusion_bits_come_from_the_audit_secret_only():
    a = _draw(7)
    # Other data (image shape, classes, model size) and nothing else: the same bits.
    b = _draw(7, image_shape=(16, 16, 3), num_classes=2, num_trainable=100_000)
    np.testing.assert_array_equal(a.input_bits, b.input_bits)
    np.testing.assert_array_equal(a.gradient_bits, b.gradient_bits)
    assert not np.array_equal(a.input_bits, _draw(8).input_bits)
    # Fresh OS randomness when no secret is given (every real audit): two draws differ.
    assert not np.array_equal(_draw(None).gradient_bits, _draw(None).gradient_bits)
    for bits in (a.input_bits, a.gradient_bits):
        assert 150 < bits.sum() < 250  # Bernoulli(1/2) each, 400 of them
    assert len(np.unique(a.coordinates)) == 400 and a.coordinates.max() < 5000


def test_inclusion_bits_ignore_the_training_seed_and_the_data(tiny_config, monkeypatch, tmp_path):
    bits = []
    for seed, max_examples in ((0, 40), (123, 60)):
        config = tiny_config()
        config.seed, config.data.max_examples = seed, max_examples
        config.audit.num_canaries = 64
        exp = build_experiment(config)
        monkeypatch.setattr(audit_run, "_secret_seed", lambda: 99)
        injector = audit_run._canary_factory(config, str(tmp_path / f"fixed{seed}"))(exp)
        bits.append(injector.canaries.gradient_bits)
        monkeypatch.undo()
        fresh = audit_run._canary_factory(config, str(tmp_path / f"fresh{seed}"))(exp)
        assert not np.array_equal(fresh.canaries.gradient_bits, bits[-1])
    np.testing.assert_array_equal(bits[0], bits[1])


def test_canary_file_round_trip(tmp_path):
    a = _draw(3)
    a.save(str(tmp_path / "c.npz"))
    b = CanarySet.load(str(tmp_path / "c.npz"))
    for field in dataclasses.fields(CanarySet):
        np.testing.assert_array_equal(getattr(a, field.name), getattr(b, field.name))


def test_draw_refuses_bad_requests():
    with pytest.raises(ValueError, match="audit.kind"):
        draw_canaries("weights", 10, image_shape=(8, 8, 1), num_classes=2, num_trainable=100)
    with pytest.raises(ValueError, match="coordinates"):
        draw_canaries("gradient", 200, image_shape=(8, 8, 1), num_classes=2, num_trainable=100)


@pytest.fixture(scope="module")
def injector(tiny_config):
    config = tiny_config()
    config.data.max_examples = 30
    exp = build_experiment(config)
    canaries = draw_canaries("both", 20, image_shape=exp.dataset.image_shape,
                             num_classes=exp.dataset.num_classes, num_trainable=40_000,
                             secret_seed=5)
    return CanaryInjector(canaries, exp, clip_norm=0.7)


def test_route_keeps_real_rows_and_included_canaries_only(injector):
    c, n = injector.canaries, injector.num_real
    assert len(injector.experiment.dataset) == n + 40
    selected = np.arange(n + 40)  # everything drawn
    rows, extra = injector.route(selected)
    expected = np.concatenate([np.arange(n), n + np.flatnonzero(c.input_bits)])
    np.testing.assert_array_equal(rows, expected)  # no gradient placeholder ever reaches the model
    np.testing.assert_array_equal(injector.experiment.dataset.images[n:n + 20], c.input_images)
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(extra)])
    # Each included gradient canary adds exactly C on its own coordinate; nothing else.
    assert np.count_nonzero(flat) == c.gradient_bits.sum()
    np.testing.assert_allclose(flat[c.coordinates[c.gradient_bits]], 0.7)
    np.testing.assert_allclose(np.linalg.norm(flat), 0.7 * np.sqrt(c.gradient_bits.sum()),
                               rtol=1e-6)
    rows, extra = injector.route(np.arange(n))  # no canary drawn: a zero sum
    assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(extra))


def test_release_tap_records_the_noisy_released_update(injector):
    c = injector.canaries
    params = jax.eval_shape(injector.experiment.init_params)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    opt = optax.chain(
        dp_aggregate(clip_norm=0.7, noise_multiplier=2.0, expected_batch_size=4.0, seed=1),
        injector.release_tap(noise_multiplier=2.0, sampling_rate=0.25, expected_batch_size=4.0))
    state = opt.init(params)
    _, extra = injector.route(np.arange(injector.num_real + 40))
    released, state = opt.update(extra, state, params)
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(released)])
    scores = released_scores(state)
    np.testing.assert_allclose(scores.released, flat[c.coordinates], rtol=1e-6)
    x = flat[c.coordinates] * 4.0 / 0.7  # in units of C: N(1, 4) if drawn, N(0, 4) if not
    llr = np.logaddexp(np.log(0.75), np.log(0.25) + (x - 0.5) / 4.0)
    np.testing.assert_allclose(scores.log_likelihood_ratio, llr, rtol=1e-5, atol=1e-6)
    _, state = opt.update(extra, state, params)  # the next step's release adds up
    assert not np.allclose(released_scores(state).released, 2 * scores.released)  # fresh noise


def test_gradient_canaries_use_trainable_coordinates_of_a_frozen_model(tiny_config):
    from jaxdpdm.dp.clipping import param_path

    config = tiny_config()
    config.data.max_examples = 30
    exp = build_experiment(config)
    params = exp.init_params()
    paths = [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    trainable = "^" + paths[-1] + "$"  # one leaf only
    size = int(np.size(jax.tree.leaves(params)[-1]))
    canaries = draw_canaries("gradient", 8, image_shape=(8, 8, 1), num_classes=10,
                             num_trainable=size, secret_seed=2)
    injector = CanaryInjector(canaries, exp, clip_norm=1.0, trainable=trainable)
    mask = jax.tree_util.tree_map_with_path(lambda p, _: param_path(p) == paths[-1], params)
    opt = optax.chain(
        dp_aggregate(clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=1.0, seed=0,
                     trainable=mask),
        injector.release_tap(noise_multiplier=0.0, sampling_rate=0.5, expected_batch_size=1.0),
        optax.sgd(1.0))
    state = opt.init(params)
    _, extra = injector.route(np.arange(len(injector.experiment.dataset)))
    assert np.count_nonzero(np.asarray(jax.tree.leaves(extra)[-1])) == canaries.gradient_bits.sum()
    _, state = opt.update(extra, state, params)
    np.testing.assert_allclose(
        released_scores(state).released, canaries.gradient_bits.astype(np.float32))
