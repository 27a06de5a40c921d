"""Tests for jaxdpdm/images.py."""

import numpy as np
import pytest
from PIL import Image

from jaxdpdm import images


def test_uint8_round_trip_is_exact_on_all_levels():
    levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    back = images.to_uint8(images.from_uint8(levels))
    np.testing.assert_array_equal(back, levels)
    assert images.from_uint8(levels).min() == -1.0 and images.from_uint8(levels).max() == 1.0


def test_to_uint8_rounds_clips_and_handles_nan():
    x = np.array([-2.0, -1.0, 0.0, 1.0, 3.0, np.nan, -1.0 + 1.4 / 127.5], np.float32)
    np.testing.assert_array_equal(images.to_uint8(x), [0, 0, 128, 255, 255, 0, 1])
    assert images.to_uint8(x).dtype == np.uint8


def test_from_uint8_rejects_floats():
    with pytest.raises(ValueError, match="uint8"):
        images.from_uint8(np.zeros((2, 2), np.float32))


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
    assert (images.display_scale(8), images.display_scale(28), images.display_scale(64)) == (
        4, 1, 1)
    with pytest.raises(ValueError, match="scale"):
        images.encode_grid_png(tiles, rows=2, scale=0)


def test_grid_rejects_bad_input():
    with pytest.raises(ValueError):
        images.make_grid(np.zeros((2, 4, 4, 2), np.uint8), rows=1)
    with pytest.raises(ValueError):
        images.make_grid(np.zeros((2, 4, 4, 3), np.uint8), rows=0)
