"""Frechet Inception Distance: streamed activation statistics and the distance itself.

Statistics follow pytorch-fid: mean `mu` and covariance `sigma` of pool3 features with
`ddof=1` (as `np.cov`), stored as `.npz` with keys `mu` and `sigma`, so reference statistics
computed by either implementation are interchangeable. Accumulation is on the host in float64,
streamed over batches, so 50k images never have to be held in memory at once.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable, Iterable

import numpy as np
import scipy.linalg

from jaxdpdm import storage


class ActivationStatistics:
    """Running mean and covariance of feature vectors, float64, numerically shifted.

    Sums are taken of `x - shift` where `shift` is the first batch's mean: for features with a
    large common offset this avoids the cancellation of the textbook `E[xx^T] - mu mu^T`.

    Usage: `stats.update(features [b, D])` any number of times, then `stats.mean_and_cov()`.
    """

    def __init__(self):
        self.count = 0
        self._shift = None
        self._sum = None
        self._outer = None

    def update(self, features) -> None:
        """Adds a batch of features `[b, D]` (any float dtype; converted to float64)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be [batch, dim], got shape {x.shape}")
        if x.shape[0] == 0:
            return
        if self._shift is None:
            self._shift = x.mean(axis=0)
            self._sum = np.zeros_like(self._shift)
            self._outer = np.zeros((x.shape[1], x.shape[1]), np.float64)
        elif x.shape[1] != self._shift.shape[0]:
            raise ValueError(f"feature dim changed from {self._shift.shape[0]} to {x.shape[1]}")
        centered = x - self._shift
        self._sum += centered.sum(axis=0)
        self._outer += centered.T @ centered
        self.count += x.shape[0]

    def mean_and_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns `(mu f64[D], sigma f64[D, D])`, sigma with ddof=1. Needs >= 2 samples."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.count}")
        mean_centered = self._sum / self.count
        cov = (self._outer - self.count * np.outer(mean_centered, mean_centered)) / (self.count - 1)
        return self._shift + mean_centered, (cov + cov.T) / 2.0  # exact symmetry for sqrtm


def compute_statistics(feature_fn: Callable[[np.ndarray], np.ndarray],
                       images_iter: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Streams image batches through `feature_fn` and returns `(mu, sigma)` in float64.

    Args:
      feature_fn: images `[b, H, W, C]` -> features `[b, D]`, e.g. `inception.make_feature_fn`.
      images_iter: iterable of uint8 image batches `[b, H, W, C]` (batch sizes may vary).
    Returns:
      `mu` f64 `[D]`, `sigma` f64 `[D, D]` (ddof=1, as pytorch-fid).
    """
    stats = ActivationStatistics()
    for images in images_iter:
        stats.update(feature_fn(images))
    return stats.mean_and_cov()


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6,
                     max_imaginary: float = 1e-3) -> float:
    """Frechet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    `||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2))`, in float64.
    A singular product (fewer samples than dimensions) can make `sqrtm` non-finite: then
    `eps * I` is added to both covariances (pytorch-fid's safeguard). Round-off gives `sqrtm`
    a tiny imaginary part, which is dropped; an imaginary diagonal larger than `max_imaginary`
    means the inputs are not covariance matrices and raises `ValueError`.

    Args:
      mu1, mu2: means `[D]`. sigma1, sigma2: covariances `[D, D]`.
    Returns:
      The distance, a Python float.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means must be vectors of equal length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be [{d}, {d}], got {sigma1.shape} and {sigma2.shape}")
    for name, arr in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} has non-finite entries")

    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
        offset = np.eye(d) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest = np.max(np.abs(np.diagonal(covmean).imag))
        if largest > max_imaginary:
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has imaginary component {largest:.3g}; "
                             "are the inputs covariance matrices?")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def save_stats(path: str | os.PathLike, mu, sigma) -> str:
    """Writes `mu`, `sigma` to `path` (`.npz`, pytorch-fid's keys) atomically; returns the path."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    _check_stats(mu, sigma, os.fspath(path))
    path = os.fspath(path)
    buffer = io.BytesIO()
    np.savez(buffer, mu=mu, sigma=sigma)
    storage.write_bytes(path, buffer.getvalue())
    return path


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads `(mu f64[D], sigma f64[D, D])` from an `.npz` with keys `mu` and `sigma`."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if "mu" not in data.files or "sigma" not in data.files:
                raise ValueError(f"{path!r} lacks 'mu'/'sigma' (has {sorted(data.files)})")
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"cannot read FID statistics {path!r}: {e}") from e
    _check_stats(mu, sigma, path)
    return mu, sigma


def load_or_compute_stats(path: str | os.PathLike, compute: Callable[[], tuple[np.ndarray,
                                                                               np.ndarray]]):
    """Returns cached statistics from `path`, or calls `compute()` and caches its result there."""
    if os.path.exists(path):
        return load_stats(path)
    mu, sigma = compute()
    save_stats(path, mu, sigma)
    return np.asarray(mu, np.float64), np.asarray(sigma, np.float64)


def _check_stats(mu: np.ndarray, sigma: np.ndarray, where: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{where}: expected mu [D] and sigma [D, D], "
                         f"got {mu.shape} and {sigma.shape}")
