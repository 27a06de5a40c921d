"""Tests for jaxdpdm/data/preprocessing.py."""

import numpy as np
import pytest
from PIL import Image

from jaxdpdm.data import preprocessing
from jaxdpdm.data.dataset import ImageDataset


def _random_images(seed, shape):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_resize_upsamples_digits_size_and_keeps_constant_images_constant(channels):
    images = np.full((3, 8, 8, channels), 77, dtype=np.uint8)
    resized = preprocessing.resize_images(images, 16)
    assert resized.shape == (3, 16, 16, channels) and resized.dtype == np.uint8
    assert np.all(resized == 77)


def test_resize_downsampling_is_area_average():
    images = _random_images(0, (4, 8, 8, 1))
    resized = preprocessing.resize_images(images, 4)
    block_means = images.reshape(4, 4, 2, 4, 2, 1).mean(axis=(2, 4))
    np.testing.assert_allclose(resized, block_means, atol=1.0)


def test_resize_center_crops_non_square_images():
    images = np.zeros((1, 4, 8, 1), dtype=np.uint8)
    images[:, :, 2:6] = 200  # the central 4x4 square
    resized = preprocessing.resize_images(images, 4)
    assert resized.shape == (1, 4, 4, 1) and np.all(resized == 200)


def test_resize_returns_input_when_size_matches():
    images = _random_images(1, (2, 5, 5, 3))
    assert preprocessing.resize_images(images, 5) is images


def test_gray_to_rgb_repeats_and_back_is_identity():
    gray = _random_images(2, (5, 6, 6, 1))
    rgb = preprocessing.convert_channels(gray, 3)
    assert rgb.shape == (5, 6, 6, 3) and np.all(rgb == gray)
    np.testing.assert_array_equal(preprocessing.convert_channels(rgb, 1), gray)


def test_rgb_to_gray_matches_pil_luma():
    rgb = _random_images(3, (4, 7, 7, 3))
    gray = preprocessing.convert_channels(rgb, 1)
    expected = np.stack([np.asarray(Image.fromarray(image).convert("L")) for image in rgb])
    np.testing.assert_array_equal(gray[..., 0], expected)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, 4, 4, 4), np.uint8),
     np.zeros((2, 4, 4, 1)),
     np.zeros((4, 4, 1), np.uint8)])
def test_image_functions_reject_bad_batches(bad):
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]|channels"):
        preprocessing.convert_channels(bad, 3)


@pytest.mark.parametrize("seed", range(3))
def test_select_classes_keeps_and_relabels_in_given_order(seed):
    labels = np.random.default_rng(seed).integers(0, 10, 200)
    keep = (7, 2, 5)
    positions, new_labels = preprocessing.select_classes(labels, keep)
    assert np.all(np.isin(labels[positions], keep))
    assert np.sum(np.isin(labels, keep)) == positions.size
    assert np.all(np.diff(positions) > 0)  # source order preserved
    np.testing.assert_array_equal(np.asarray(keep)[new_labels], labels[positions])


@pytest.mark.parametrize("keep", [(), (1, 1)])
def test_select_classes_rejects_empty_or_repeated(keep):
    with pytest.raises(ValueError):
        preprocessing.select_classes(np.arange(5), keep)


@pytest.mark.parametrize("seed", range(4))
def test_public_private_split_is_disjoint_complete_stratified_and_deterministic(seed):
    labels = np.random.default_rng(seed + 100).integers(0, 4, 300)
    public, private = preprocessing.public_private_indices(labels, 0.25, seed=seed)
    assert np.intersect1d(public, private).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([public, private])), np.arange(300))
    for label in range(4):
        in_class = np.sum(labels == label)
        assert np.sum(labels[public] == label) == np.floor(0.25 * in_class + 0.5)
    again = preprocessing.public_private_indices(labels, 0.25, seed=seed)
    np.testing.assert_array_equal(again[0], public)
    other = preprocessing.public_private_indices(labels, 0.25, seed=seed + 1)
    assert not np.array_equal(other[0], public)


def test_public_private_split_never_changes():
    # A deliberate snapshot: if this split ever changed (e.g. with a numpy upgrade), a
    # private run could contain examples a non-private run used as public data.
    public, private = preprocessing.public_private_indices(np.zeros(10, int), 0.3, seed=0)
    np.testing.assert_array_equal(public, [0, 3, 6])
    np.testing.assert_array_equal(private, [1, 2, 4, 5, 7, 8, 9])


def test_a_class_split_does_not_depend_on_other_classes():
    labels = np.random.default_rng(5).integers(0, 3, 120)
    public, _ = preprocessing.public_private_indices(labels, 0.4, seed=9)
    relabelled = np.where(labels == 2, 2, 0)  # classes 0 and 1 merged: class 2 unchanged
    public_merged, _ = preprocessing.public_private_indices(relabelled, 0.4, seed=9)
    np.testing.assert_array_equal(public[labels[public] == 2],
                                  public_merged[relabelled[public_merged] == 2])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_public_private_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="public_fraction"):
        preprocessing.public_private_indices(np.zeros(10, int), fraction, seed=0)


def numbered_dataset(num=40, num_classes=4):
    """Example i has every pixel equal to i, so images identify examples."""
    images = np.arange(num, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8)
    labels = np.arange(num) % num_classes
    return ImageDataset(images, labels, num_classes, ("a", "b", "c", "d")[:num_classes], "numbered",
                        "generated")


def test_split_public_private_datasets_are_disjoint_and_complete():
    public, private = preprocessing.split_public_private(numbered_dataset(), 0.25, seed=7)
    public_ids, private_ids = set(public.images[:, 0, 0, 0]), set(private.images[:, 0, 0, 0])
    assert not public_ids & private_ids and public_ids | private_ids == set(range(40))
    assert len(public) == 4 * 3  # 2.5 of each class's 10 examples rounds up to 3
    np.testing.assert_array_equal(public.labels, public.images[:, 0, 0, 0] % 4)
    assert "public part" in public.source and "seed=7" in private.source


def test_filter_classes_by_name_and_id_records_mapping():
    kept = preprocessing.filter_classes(numbered_dataset(), ("d", 1))
    assert kept.class_names == ("d", "b") and kept.original_class_ids == (3, 1)
    np.testing.assert_array_equal(np.asarray([3, 1])[kept.labels], kept.images[:, 0, 0, 0] % 4)
    twice = preprocessing.filter_classes(kept, (1,))
    assert twice.original_class_ids == (1,) and twice.class_names == ("b",)
