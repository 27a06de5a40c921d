"""`--mode=evaluate` pieces: the summary text, and FID with a stand-in feature network.

No Inception weights exist on this machine, so `compute_fid` is run with
`inception.load_inception_params` / `make_feature_fn` replaced by a fixed random projection of
the pixels: that checks the plumbing (batching, statistics, caching), not the network.
"""

import os

import numpy as np
import pytest

from jaxdpdm.config import get_config
from jaxdpdm.evaluation import fid, inception
from jaxdpdm.evaluation import run as run_lib

FEATURE_DIM = 6


def _summary_report(*, with_fid: bool, with_privacy: bool, real_reference: bool = True):
    return {
        "samples": {"num": 40, "shape": [8, 8, 1]},
        "privacy": ({"epsilon_pld": 9.87654, "epsilon_rdp": 11.5, "delta": 1e-5}
                    if with_privacy else None),
        "fid": ({"fid": 12.3456, "num_synthetic": 40, "num_real": 1437,
                 "reference": "digits_train_8px"} if with_fid else None),
        "downstream": {"synthetic_to_real_test_accuracy": 0.81234,
                       "real_to_real_test_accuracy": 0.95 if real_reference else None},
    }


@pytest.mark.parametrize("with_fid", [True, False])
@pytest.mark.parametrize("with_privacy", [True, False])
def test_format_summary(with_fid, with_privacy):
    text = run_lib.format_summary(_summary_report(with_fid=with_fid, with_privacy=with_privacy))
    assert "40 of shape (8, 8, 1)" in text
    assert "0.8123" in text and "0.9500" in text
    if with_privacy:
        assert "(9.877, 1.0e-05)-DP" in text and "11.500" in text
    else:
        assert "no privacy_report.json" in text
    if with_fid:
        assert "FID: 12.35" in text and "40 synthetic vs 1437 real" in text
        assert "digits_train_8px" in text
    else:
        assert "FID: not computed" in text and "eval.inception_weights" in text
    assert text.endswith("\n")


def test_format_summary_without_real_reference():
    text = run_lib.format_summary(
        _summary_report(with_fid=False, with_privacy=False, real_reference=False))
    assert "trained on the real training data" not in text


# --- compute_fid with a stand-in feature function ---------------------------------------------------

class ProjectionFeatures:
    """`features(uint8 [b, H, W, C]) -> f32 [b, FEATURE_DIM]`: a fixed random projection; counts
    the images it saw and checks the batch size `compute_fid` promised."""

    def __init__(self, batch_size: int, num_pixels: int):
        self.batch_size = batch_size
        self.projection = np.random.default_rng(1).standard_normal((num_pixels, FEATURE_DIM))
        self.images_seen = 0

    def __call__(self, images):
        images = np.asarray(images)
        assert images.dtype == np.uint8 and 1 <= len(images) <= self.batch_size
        self.images_seen += len(images)
        return (images.reshape(len(images), -1) / 255.0 @ self.projection).astype(np.float32)


@pytest.fixture
def stand_in_inception(monkeypatch):
    """Replaces the Inception loader and feature function; returns the list of feature fns."""
    made = []

    def load_params(path):
        assert path == "/weights/pt_inception.npz"
        return {"params": "stand-in"}

    def make_feature_fn(params, batch_size, **kwargs):
        assert params == {"params": "stand-in"}
        made.append(ProjectionFeatures(batch_size, num_pixels=8 * 8))
        return made[-1]

    monkeypatch.setattr(inception, "load_inception_params", load_params)
    monkeypatch.setattr(inception, "make_feature_fn", make_feature_fn)
    return made


def _config(batch_size=16):
    config = get_config()
    config.eval.inception_weights = "/weights/pt_inception.npz"
    config.eval.fid_batch_size = batch_size
    return config


def _images(seed, n=50):
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


def test_fid_of_a_set_with_itself_is_zero(tmp_path, stand_in_inception):
    real = _images(0)
    result = run_lib.compute_fid(_config(), real, real, str(tmp_path), "digits")
    assert abs(result["fid"]) < 1e-6
    assert (result["num_synthetic"], result["num_real"]) == (50, 50)
    assert result["reference"] == "digits"


def test_fid_grows_with_the_distance_between_sets(tmp_path, stand_in_inception):
    real = _images(0)
    near = np.clip(real.astype(int) + 10, 0, 255).astype(np.uint8)
    far = np.clip(real.astype(int) + 80, 0, 255).astype(np.uint8)
    fid_near = run_lib.compute_fid(_config(), near, real, str(tmp_path), "digits")["fid"]
    fid_far = run_lib.compute_fid(_config(), far, real, str(tmp_path), "digits")["fid"]
    assert 0 < fid_near < fid_far


def test_reference_statistics_are_cached_and_reused(tmp_path, stand_in_inception):
    real, synthetic = _images(0), _images(1, n=30)
    first = run_lib.compute_fid(_config(), synthetic, real, str(tmp_path), "digits_train_8px")
    cache = os.path.join(tmp_path, "fid_stats_digits_train_8px.npz")
    assert first["reference_stats"] == cache
    with np.load(cache) as stats:
        assert stats["mu"].shape == (FEATURE_DIM,)
        assert stats["sigma"].shape == (FEATURE_DIM, FEATURE_DIM)
    assert stand_in_inception[0].images_seen == 50 + 30

    # Second call: other "real" images under the same name are not even looked at.
    second = run_lib.compute_fid(_config(), synthetic, _images(2), str(tmp_path),
                                 "digits_train_8px")
    assert stand_in_inception[1].images_seen == 30
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-9)
    mu, sigma = fid.load_stats(cache)
    assert mu.shape == (FEATURE_DIM,) and sigma.shape == (FEATURE_DIM, FEATURE_DIM)


def test_fid_does_not_depend_on_the_batch_size(tmp_path, stand_in_inception):
    real, synthetic = _images(0), _images(1, n=30)
    values = [run_lib.compute_fid(_config(batch), synthetic, real, str(tmp_path / str(batch)),
                                  "digits")["fid"] for batch in (7, 50)]
    assert values[0] == pytest.approx(values[1], rel=1e-6)
