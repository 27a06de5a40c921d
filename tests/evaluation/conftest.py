"""Fixtures of the evaluation tests."""

import numpy as np
import pytest
from sklearn.datasets import load_digits


@pytest.fixture(scope="session")
def shuffled_digits():
    """Shuffled digits: images uint8[1797, 8, 8, 1] (0..16 scaled to 0..255), labels int32."""
    data = load_digits()
    images = np.round(data.images * (255 / 16)).astype(np.uint8)[..., None]
    order = np.random.default_rng(0).permutation(len(data.target))
    return images[order], data.target[order].astype(np.int32)
