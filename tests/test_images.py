"""Tests for jaxdpdm/images.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxdpdm import images


def test_model_range_endpoints_and_exact_round_trip_on_all_levels():
    levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    values = images.to_model_range(levels)
    assert values.dtype == np.float32 and values.shape == levels.shape
    assert values.min() == -1.0 and values.max() == 1.0
    assert np.all(np.diff(values.ravel()) > 0)
    np.testing.assert_array_equal(images.from_model_range(values), levels)


def test_to_model_range_in_jit_agrees_with_numpy_and_round_trips():
    levels = np.arange(256, dtype=np.uint8)
    on_device = jax.jit(images.to_model_range)(jnp.asarray(levels))
    assert on_device.dtype == jnp.float32
    # XLA turns the division into a multiplication: at most one float32 ulp apart.
    np.testing.assert_allclose(np.asarray(on_device), images.to_model_range(levels), rtol=0,
                               atol=np.finfo(np.float32).eps)
    np.testing.assert_array_equal(images.from_model_range(on_device), levels)


def test_from_model_range_rounds_clips_and_handles_nan():
    x = np.array([-2.0, -1.0, 0.0, 1.0, 3.0, np.nan, -1.0 + 1.4 / 127.5], np.float32)
    np.testing.assert_array_equal(images.from_model_range(x), [0, 0, 128, 255, 255, 0, 1])
    assert images.from_model_range(x).dtype == np.uint8


def test_to_model_range_rejects_floats():
    with pytest.raises(ValueError, match="uint8"):
        images.to_model_range(np.zeros((2, 2), np.float32))


def test_grid_layout():
    rng = np.random.default_rng(0)
    tiles = rng.integers(1, 256, (5, 3, 4, 3), dtype=np.uint8)
    grid = images.make_grid(tiles, rows=2, padding=1)
    assert grid.shape == (2 * 4 + 1, 3 * 5 + 1, 3)  # 3 columns
    np.testing.assert_array_equal(grid[1:4, 1:5], tiles[0])
    np.testing.assert_array_equal(grid[5:8, 6:10], tiles[4])  # row 1, column 1
    assert not grid[5:8, 11:15].any()  # the sixth cell is empty


def test_save_grid_png_round_trip(tmp_path):
    tiles = np.random.default_rng(1).integers(0, 256, (6, 5, 5, 1), dtype=np.uint8)
    path = images.save_grid_png(tiles, tmp_path / "sub" / "grid.png", rows=3)
    loaded = np.asarray(Image.open(path))
    np.testing.assert_array_equal(loaded, images.make_grid(tiles, rows=3)[..., 0])
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["grid.png"]  # no temp file left


def test_scaled_grid_repeats_pixels(tmp_path):
    tiles = np.random.default_rng(2).integers(0, 256, (4, 3, 3, 1), dtype=np.uint8)
    path = images.save_grid_png(tiles, tmp_path / "grid.png", rows=2, scale=3)
    loaded = np.asarray(Image.open(path))
    grid = images.make_grid(tiles, rows=2)[..., 0]
    np.testing.assert_array_equal(loaded, np.repeat(np.repeat(grid, 3, axis=0), 3, axis=1))
    assert (images.display_scale(8), images.display_scale(28), images.display_scale(64)) == (4, 1,
                                                                                             1)
    with pytest.raises(ValueError, match="scale"):
        images.encode_grid_png(tiles, rows=2, scale=0)


def test_grid_rejects_bad_input():
    with pytest.raises(ValueError):
        images.make_grid(np.zeros((2, 4, 4, 2), np.uint8), rows=1)
    with pytest.raises(ValueError):
        images.make_grid(np.zeros((2, 4, 4, 3), np.uint8), rows=0)
