"""Tests for jaxdpdm/evaluation/fid.py."""

import numpy as np
import pytest
import scipy.linalg

from jaxdpdm.evaluation import fid


def random_stats(seed, n=300, d=12, offset=0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + offset + rng.normal(size=d)
    return x.mean(0), np.cov(x, rowvar=False)


def test_distance_to_itself_is_zero():
    mu, sigma = random_stats(0)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_agrees_with_independent_scipy_formula_and_is_symmetric():
    (mu1, s1), (mu2, s2) = random_stats(1), random_stats(2)
    # tr sqrtm(s1 s2) = tr sqrtm(s1^1/2 s2 s1^1/2): a different, symmetric-matrix route.
    root1 = scipy.linalg.sqrtm(s1).real
    direct = (np.sum((mu1 - mu2)**2) + np.trace(s1) + np.trace(s2) -
              2 * np.trace(scipy.linalg.sqrtm(root1 @ s2 @ root1).real))
    d12, d21 = fid.frechet_distance(mu1, s1, mu2, s2), fid.frechet_distance(mu2, s2, mu1, s1)
    np.testing.assert_allclose(d12, direct, rtol=1e-8)
    np.testing.assert_allclose(d12, d21, rtol=1e-8)


def test_diagonal_gaussians_closed_form():
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, 2.0])
    expected = 5.0 + np.sum((np.sqrt(v1) - np.sqrt(v2))**2)
    np.testing.assert_allclose(fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)), expected)


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")
def test_agrees_with_pytorch_fid():
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    (mu1, s1), (mu2, s2) = random_stats(3), random_stats(4)
    np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2),
                               fid_score.calculate_frechet_distance(mu1, s1, mu2, s2), rtol=1e-8)


def test_streamed_statistics_equal_one_shot():
    rng = np.random.default_rng(5)
    # A large common offset: the naive E[xx^T] - mu mu^T would lose most digits here.
    features = (rng.normal(size=(103, 7)) * 0.01 + 1e4).astype(np.float32)
    batches = [features[:1], features[1:40], features[40:41], features[41:]]
    stats = fid.ActivationStatistics()
    for b in batches:
        stats.update(b)
    mu, sigma = stats.mean_and_cov()
    f64 = features.astype(np.float64)
    np.testing.assert_allclose(mu, f64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f64, rowvar=False, ddof=1), rtol=1e-8, atol=1e-14)


def test_compute_statistics_streams_images_through_the_feature_fn():
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (20, 2, 2, 1), dtype=np.uint8)
    feature_fn = lambda x: x.reshape(x.shape[0], -1).astype(np.float32) / 255.0  # noqa: E731
    mu, sigma = fid.compute_statistics(feature_fn, (images[i:i + 6] for i in range(0, 20, 6)))
    flat = images.reshape(20, -1) / 255.0
    np.testing.assert_allclose(mu, flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(flat, rowvar=False), rtol=1e-5, atol=1e-12)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_singular_covariance_gives_finite_distance():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(5, 20)), rng.normal(size=(6, 20))  # fewer samples than dims
    d = fid.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert np.isfinite(d) and d > 0
    zero = np.zeros((20, 20))
    assert np.isfinite(fid.frechet_distance(np.zeros(20), zero, np.zeros(20), zero))


def test_large_imaginary_component_is_an_error():
    with pytest.raises(ValueError, match="imaginary"):
        fid.frechet_distance(np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2))


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError):
        fid.ActivationStatistics().mean_and_cov()


def test_stats_round_trip_and_cache(tmp_path):
    mu, sigma = random_stats(8)
    path = tmp_path / "ref.npz"
    fid.save_stats(path, mu, sigma)
    with np.load(path) as data:  # pytorch-fid's format
        assert sorted(data.files) == ["mu", "sigma"]
    mu2, sigma2 = fid.load_stats(path)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    calls = []

    def compute():
        calls.append(1)
        return random_stats(9)

    first = fid.load_or_compute_stats(tmp_path / "cache.npz", compute)
    second = fid.load_or_compute_stats(tmp_path / "cache.npz", compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(first[1], second[1])
    np.savez(tmp_path / "wrong.npz", mean=mu)
    with pytest.raises(ValueError, match="mu"):
        fid.load_stats(tmp_path / "wrong.npz")
