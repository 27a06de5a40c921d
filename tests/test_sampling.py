"""Tests for jaxdpdm/sampling.py: samplers on analytic and tiny random models, guidance, resume."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdpdm import diffusion, sampling

T = 50
SHAPE = (4, 4, 2)
NUM_CLASSES = 3
NULL = NUM_CLASSES


@pytest.fixture(scope="module")
def schedule():
    return diffusion.make_schedule("linear", T)


def point_mass_model(params, x, t, y):
    """Optimal eps-predictor when class y's data is a point mass at params[y]:
    eps*(x_t, t) = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t)."""
    abar = params["abar"][t][:, None, None, None]
    target = params["centers"][y]
    return (x - jnp.sqrt(abar) * target) / jnp.sqrt(1.0 - abar)


def point_mass_params(schedule, seed=0):
    centers = np.random.default_rng(seed).uniform(-0.8, 0.8, (NUM_CLASSES + 1, *SHAPE))
    return {"abar": schedule.alphas_cumprod, "centers": jnp.asarray(centers, jnp.float32)}


def random_model(params, x, t, y):
    """A tiny smooth eps-model that depends on x, t and y (no closed form)."""
    return jnp.tanh(x * params["w"][t][:, None, None, None] + params["b"][y])


def random_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.uniform(0.5, 1.5, (T,)), jnp.float32),
        "b": jnp.asarray(rng.normal(0, 0.3, (NUM_CLASSES + 1, *SHAPE)), jnp.float32)
    }


LABELS = jnp.array([0, 1, 2, 1], jnp.int32)


@pytest.mark.parametrize("method,steps,variance", [("ddpm", None, "posterior"),
                                                   ("ddpm", None, "beta"), ("ddim", 10, None),
                                                   ("ddim", 1, None)])
def test_point_mass_data_is_recovered(schedule, method, steps, variance):
    params = point_mass_params(schedule)
    sample_fn = sampling.make_sample_fn(point_mass_model, params, schedule, image_shape=SHAPE,
                                        method=method, num_steps=steps, eta=0.5,
                                        ddpm_variance=variance or "posterior")
    out = np.asarray(sample_fn(jax.random.key(1), LABELS))
    assert out.shape == (4, *SHAPE) and out.dtype == np.float32
    # x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) loses float32 digits at abar_{T-1} ~ 5e-5.
    np.testing.assert_allclose(out, np.asarray(params["centers"])[np.asarray(LABELS)], atol=5e-4)


def test_guidance_moves_point_mass_to_extrapolation(schedule):
    # With guidance the effective eps is that of the point mass (1 + w) x_y - w x_null.
    params, w = point_mass_params(schedule), 0.5
    sample_fn = sampling.make_sample_fn(point_mass_model, params, schedule, image_shape=SHAPE,
                                        method="ddim", num_steps=8, guidance_scale=w,
                                        null_label=NULL, clip_denoised=False)
    centers = np.asarray(params["centers"])
    expected = (1 + w) * centers[np.asarray(LABELS)] - w * centers[NULL]
    out = np.asarray(sample_fn(jax.random.key(2), LABELS))
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_zero_guidance_is_the_conditional_model_without_null_branch(schedule):
    params, traced_batches = random_params(), []

    def recording_model(p, x, t, y):
        traced_batches.append(x.shape[0])
        return random_model(p, x, t, y)

    key, kw = jax.random.key(3), dict(image_shape=SHAPE, num_steps=7, eta=0.3)
    plain = sampling.make_sample_fn(random_model, params, schedule, **kw)(key, LABELS)
    guided = sampling.make_sample_fn(recording_model, params, schedule, guidance_scale=0.0,
                                     null_label=NULL, **kw)(key, LABELS)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(guided))
    assert set(traced_batches) == {LABELS.shape[0]}  # the doubled (null) batch never ran


def test_guidance_without_null_label_is_refused(schedule):
    with pytest.raises(ValueError, match="null_label"):
        sampling.make_sample_fn(random_model, random_params(), schedule, image_shape=SHAPE,
                                guidance_scale=1.0)


def _numpy_ddim_eta0(params, schedule, x, labels, num_steps):
    """Independent float64 reference of deterministic DDIM with x0 clipping."""
    abar = np.asarray(schedule.alphas_cumprod, np.float64)
    w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
    steps = np.rint(np.linspace(T - 1, 0, num_steps)).astype(int)
    for i, t in enumerate(steps):
        eps = np.tanh(x * w[t] + b[labels])
        x0 = np.clip((x - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t]), -1, 1)
        eps = (x - np.sqrt(abar[t]) * x0) / np.sqrt(1 - abar[t])
        a_prev = abar[steps[i + 1]] if i + 1 < len(steps) else 1.0
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    return x


def test_ddim_eta0_is_a_deterministic_map_of_the_initial_noise(schedule):
    params, key = random_params(1), jax.random.key(6)
    sample_fn = sampling.make_sample_fn(random_model, params, schedule, image_shape=SHAPE,
                                        num_steps=12)
    out = sample_fn(key, LABELS)
    x_init = np.asarray(jax.random.normal(jax.random.split(key)[0], (4, *SHAPE)), np.float64)
    expected = _numpy_ddim_eta0(params, schedule, x_init, np.asarray(LABELS), 12)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4)


def test_ddim_eta1_with_all_steps_equals_ddpm_posterior_sampling(schedule):
    # DDIM's sigma^2 at eta=1, S=T is the posterior variance and its mean the posterior mean,
    # and both samplers key the step noise by timestep: the chains coincide.
    params, key = random_params(2), jax.random.key(7)

    def sampler(method, **kw):
        return sampling.make_sample_fn(random_model, params, schedule, image_shape=SHAPE,
                                       method=method, **kw)

    ddpm_fn = sampler("ddpm")
    ddpm = ddpm_fn(key, LABELS)
    ddim = sampler("ddim", num_steps=T, eta=1.0)(key, LABELS)
    ddim0 = sampler("ddim", num_steps=T, eta=0.0)(key, LABELS)
    # Same key, same samples; another key, other samples.
    np.testing.assert_array_equal(np.asarray(ddpm_fn(key, LABELS)), np.asarray(ddpm))
    assert not np.allclose(np.asarray(ddpm_fn(jax.random.key(8), LABELS)), np.asarray(ddpm))
    np.testing.assert_allclose(np.asarray(ddim), np.asarray(ddpm), atol=1e-4)
    assert np.abs(np.asarray(ddim0) - np.asarray(ddpm)).max() > 1e-2  # eta matters


def test_ddim_timesteps():
    np.testing.assert_array_equal(sampling.ddim_timesteps(10, 10), np.arange(9, -1, -1))
    np.testing.assert_array_equal(sampling.ddim_timesteps(1000, 1), [999])
    steps = sampling.ddim_timesteps(1000, 50)
    assert steps[0] == 999 and steps[-1] == 0 and len(np.unique(steps)) == 50
    with pytest.raises(ValueError):
        sampling.ddim_timesteps(10, 11)


def test_balanced_labels():
    labels = sampling.balanced_labels(103, 10, seed=0)
    counts = np.bincount(labels, minlength=10)
    assert labels.dtype == np.int32 and counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(labels, sampling.balanced_labels(103, 10, seed=0))
    assert not np.array_equal(labels, sampling.balanced_labels(103, 10, seed=1))


def _cheap_sample_fn(key, labels):
    """Stand-in sampler: key- and label-dependent images in [-1, 1], no model."""
    noise = jax.random.uniform(key, (labels.shape[0], 4, 4, 1), minval=-1.0, maxval=1.0)
    return 0.5 * noise + 0.4 * (labels[:, None, None, None] - 1.0)


def _read_all(out_dir):
    samples = os.path.join(out_dir, "samples")
    names = sorted(n for n in os.listdir(samples) if n.endswith(".npz"))
    return names, [dict(np.load(os.path.join(samples, n))) for n in names]


def test_generation_writes_balanced_chunks_and_a_grid(tmp_path):
    summary = sampling.generate_samples(_cheap_sample_fn, out_dir=tmp_path, num_samples=22,
                                        num_classes=3, batch_size=8, seed=0, grid_per_class=4)
    names, chunks = _read_all(tmp_path)
    assert names == ["chunk_00000.npz", "chunk_00001.npz", "chunk_00002.npz"]
    assert [c["images"].shape[0] for c in chunks] == [8, 8, 6]
    assert all(c["images"].dtype == np.uint8 and c["labels"].dtype == np.int32 for c in chunks)
    images, labels = sampling.load_samples(tmp_path)
    assert images.shape == (22, 4, 4, 1)
    np.testing.assert_array_equal(labels, sampling.balanced_labels(22, 3, seed=0))
    assert summary.num_generated == 3 and summary.num_reused == 0
    assert os.path.getsize(summary.grid_path) > 0


def test_killed_generation_resumes_to_the_uninterrupted_result(tmp_path):
    kwargs = dict(num_samples=37, num_classes=3, batch_size=8, seed=11, grid_per_class=2)
    sampling.generate_samples(_cheap_sample_fn, out_dir=tmp_path / "full", **kwargs)

    def kill_after_two(chunk_index, num_chunks):
        if chunk_index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sampling.generate_samples(_cheap_sample_fn, out_dir=tmp_path / "resumed",
                                  progress_fn=kill_after_two, **kwargs)
    assert len(_read_all(tmp_path / "resumed")[0]) == 2
    # A corrupt chunk (e.g. from a crashed copy) is regenerated, not trusted.
    with open(tmp_path / "resumed" / "samples" / "chunk_00001.npz", "r+b") as f:
        f.truncate(40)
    written = []
    summary = sampling.generate_samples(_cheap_sample_fn, out_dir=tmp_path / "resumed",
                                        progress_fn=lambda i, n: written.append(i), **kwargs)
    assert written == [1, 2, 3, 4] and summary.num_reused == 1
    full_names, full = _read_all(tmp_path / "full")
    resumed_names, resumed = _read_all(tmp_path / "resumed")
    assert full_names == resumed_names
    for a, b in zip(full, resumed):
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    with pytest.raises(ValueError, match="different settings"):
        sampling.generate_samples(_cheap_sample_fn, out_dir=tmp_path / "resumed",
                                  **{**kwargs, "seed": 12})


MESH_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jaxdpdm import diffusion, sampling
    from jax.sharding import Mesh
    assert jax.device_count() == 8
    schedule = diffusion.make_schedule("linear", 50)
    def model(p, x, t, y):
        return jnp.tanh(x * p + y[:, None, None, None] * 0.1)
    labels = jnp.arange(16, dtype=jnp.int32) % 3
    kw = dict(image_shape=(4, 4, 1), method="ddim", num_steps=5, eta=1.0)
    single = sampling.make_sample_fn(model, jnp.float32(0.7), schedule, **kw)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = sampling.make_sample_fn(model, jnp.float32(0.7), schedule, mesh=mesh, **kw)
    key = jax.random.key(0)
    a, b = single(key, labels), sharded(key, labels)
    assert len(b.sharding.device_set) == 8, b.sharding
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    print("OK")
""")


def test_sharded_sampling_matches_single_device():
    env = {
        **os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu"
    }
    result = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
