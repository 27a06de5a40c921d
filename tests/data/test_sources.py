"""Tests for jaxdpdm/data/dataset.py and sources.py: DataSpec, ImageDataset, and every source."""

import pathlib
import sys
import types

import numpy as np
import pytest
from PIL import Image

from jaxdpdm.data import idx, sources
from jaxdpdm.data.dataset import DataSpec
from jaxdpdm.data.sources import load_dataset


def spec(**overrides):
    values = dict(name="digits", image_size=8, channels=1)
    values.update(overrides)
    return DataSpec(**values)


# --- DataSpec -------------------------------------------------------------------------


def test_from_dict_round_trip_and_list_classes():
    values = dict(name="fashion_mnist", image_size=28, channels=1, classes=[0, "Bag"],
                  subset="private", public_fraction=0.2, split_seed=3)
    made = DataSpec.from_dict(values)
    assert made.classes == (0, "Bag")
    assert DataSpec.from_dict(made.to_dict()) == made
    config_like = types.SimpleNamespace(to_dict=lambda: dict(values))
    assert DataSpec.from_dict(config_like) == made


def test_from_dict_rejects_unknown_and_missing_keys():
    with pytest.raises(ValueError, match=r"unknown DataSpec keys \['imagesize'\].*image_size"):
        DataSpec.from_dict(dict(name="digits", imagesize=8, channels=1))
    with pytest.raises(ValueError, match="needs"):
        DataSpec.from_dict(dict(name="digits"))


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(ValueError, match="fashion_mnist.*tfds:<name>"):
        spec(name="cifar10")


@pytest.mark.parametrize("bad", [
    dict(image_size=0),
    dict(image_size=8.0),
    dict(channels=2),
    dict(channels=True),
    dict(max_examples=0),
    dict(classes=()),
    dict(classes=(1.5,)),
    dict(subset="half"),
    dict(subset="public"),
    dict(public_fraction=0.5),
    dict(split="validation"),
    dict(download=True),
    dict(manual_dir="/m"),
    dict(skip_corrupt=True),
    dict(name="npz"),
    dict(name="image_folder", data_dir="/d", split="test"),
    dict(name="fashion_mnist", manual_dir="/m"),
    dict(split_seed=-1),
    dict(subset="public", public_fraction="0.5"),
    dict(name="tfds:"),
    dict(name=3),
])
def test_invalid_specs_are_rejected_early(bad):
    with pytest.raises(ValueError):
        spec(**bad)


# --- digits ---------------------------------------------------------------------------


def test_digits_split_shapes_range_and_counts():
    train = load_dataset(spec(image_size=16))
    test = load_dataset(spec(split="test"))
    assert train.images.shape == (1442, 16, 16, 1) and test.images.shape == (355, 8, 8, 1)
    assert train.images.dtype == np.uint8 and test.labels.dtype == np.int32
    assert (test.images.min(), test.images.max()) == (0, 255)
    total = train.class_counts() + test.class_counts()
    assert total.sum() == 1797
    np.testing.assert_array_equal(test.class_counts(), total // 5)  # every 5th is test
    assert train.num_classes == 10 and train.class_names[3] == "3"
    rgb = load_dataset(spec(channels=3, split="test"))
    np.testing.assert_array_equal(rgb.images, np.repeat(test.images, 3, axis=-1))


def test_class_filter_relabels_and_reports_mapping():
    full = load_dataset(spec(split="test"))
    picked = load_dataset(spec(split="test", classes=(7, "2")))
    assert picked.num_classes == 2 and picked.class_names == ("7", "2")
    assert picked.original_class_ids == (7, 2)
    np.testing.assert_array_equal(picked.class_counts(), full.class_counts()[[7, 2]])
    assert "7->0, 2->1" in picked.summary()
    with pytest.raises(ValueError, match="no class 'eleven'"):
        load_dataset(spec(classes=("eleven",)))
    with pytest.raises(ValueError, match="outside"):
        load_dataset(spec(classes=(10,)))


def test_public_and_private_subsets_are_disjoint_and_cover_the_data():
    full = load_dataset(spec(split="test"))
    parts = {
        subset: load_dataset(spec(split="test", subset=subset, public_fraction=0.3))
        for subset in ("public", "private")
    }
    assert len(parts["public"]) + len(parts["private"]) == len(full)

    def as_rows(d):  # (pixels, source class) of every example
        return {
            row.tobytes() + bytes([d.original_class_ids[label]])
            for row, label in zip(d.images, d.labels)
        }

    assert not as_rows(parts["public"]) & as_rows(parts["private"])
    assert as_rows(parts["public"]) | as_rows(parts["private"]) == as_rows(full)
    assert "private part" in parts["private"].source
    # The split happens before class filtering, so a filtered private part never contains
    # an example of the unfiltered public part.
    private_two = load_dataset(
        spec(split="test", subset="private", public_fraction=0.3, classes=(3, 5)))
    assert not as_rows(private_two) & as_rows(parts["public"])
    assert len(private_two) == np.sum(np.isin(parts["private"].labels, (3, 5)))


def test_max_examples_keeps_the_first_examples():
    dataset = load_dataset(spec(max_examples=10))
    assert len(dataset) == 10
    np.testing.assert_array_equal(dataset.images, load_dataset(spec()).images[:10])


def test_summary_mentions_source_size_shape_range_classes():
    text = load_dataset(spec(split="test")).summary()
    for part in ("digits", "load_digits", "355 images", "8x8x1", "[0, 255]", "10 classes"):
        assert part in text


# --- npz ------------------------------------------------------------------------------


def test_npz_file_round_trip_with_resize_and_class_names(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 4, 4), dtype=np.uint8)  # [N, H, W] form
    labels = rng.integers(0, 3, 7)
    np.savez(tmp_path / "data.npz", images=images, labels=labels,
             class_names=np.array(["a", "b", "c"]))
    exact = load_dataset(spec(name="npz", data_dir=str(tmp_path / "data.npz"), image_size=4))
    np.testing.assert_array_equal(exact.images[..., 0], images)
    np.testing.assert_array_equal(exact.labels, labels)
    assert exact.class_names == ("a", "b", "c")
    bigger = load_dataset(spec(name="npz", data_dir=str(tmp_path / "data.npz"), channels=3))
    assert bigger.images.shape == (7, 8, 8, 3)


def test_npz_folder_concatenates_chunks_and_skips_corrupt(tmp_path):
    for chunk in range(3):
        np.savez(tmp_path / f"samples_{chunk:03d}.npz", images=np.full(
            (2, 8, 8, 1), chunk, np.uint8), labels=np.array([chunk, 0]))
    loaded = load_dataset(spec(name="npz", data_dir=str(tmp_path)))
    np.testing.assert_array_equal(loaded.labels, [0, 0, 1, 0, 2, 0])
    assert loaded.num_classes == 3 and loaded.num_skipped == 0
    (tmp_path / "samples_999.npz").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="samples_999.npz"):
        load_dataset(spec(name="npz", data_dir=str(tmp_path)))
    skipping = load_dataset(spec(name="npz", data_dir=str(tmp_path), skip_corrupt=True))
    assert len(skipping) == 6 and skipping.num_skipped == 1
    assert "1 unreadable files skipped" in skipping.summary()


@pytest.mark.parametrize("arrays, message", [
    (dict(images=np.zeros((2, 4, 4), np.uint8)), "missing keys"),
    (dict(images=np.zeros((2, 4, 4), np.float32), labels=np.zeros(2, int)), "uint8"),
    (dict(images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(3, int)), "labels"),
    (dict(images=np.zeros((2, 4, 4), np.uint8), labels=np.array([0, -1])), ">= 0"),
])
@pytest.mark.parametrize("skip_corrupt", [False, True])
def test_npz_bad_contents_name_the_file(tmp_path, arrays, message, skip_corrupt):
    # Wrong contents are a pipeline bug, not an unreadable file: never skipped.
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message) as error:
        load_dataset(spec(name="npz", data_dir=str(tmp_path / "bad.npz"),
                          skip_corrupt=skip_corrupt))
    assert "bad.npz" in str(error.value)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x8f\x02random bytes that are no archive", "not an .npz archive"),  # was "pickled data"
        (b"", "not an .npz archive"),
        (b"\x93NUMPY\x01\x00rest of an .npy header", "single .npy array"),
    ])
def test_npz_that_is_no_archive_says_so(tmp_path, content, message):
    (tmp_path / "data.npz").write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        load_dataset(spec(name="npz", data_dir=str(tmp_path / "data.npz")))
    assert "data.npz" in str(error.value) and "pickled" not in str(error.value)


def test_npz_folder_with_mixed_shapes_names_the_file(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 8, 8, 1), np.uint8), labels=[0, 1])
    np.savez(tmp_path / "b.npz", images=np.zeros((2, 16, 16, 1), np.uint8), labels=[0, 1])
    with pytest.raises(ValueError, match="one shape") as error:
        load_dataset(spec(name="npz", data_dir=str(tmp_path)))
    assert "b.npz" in str(error.value) and "(16, 16, 1)" in str(error.value)


def test_npz_with_no_images_says_so(tmp_path):
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 8, 8, 1), np.uint8),
             labels=np.zeros(0, int))
    with pytest.raises(ValueError, match="holds 0 images") as error:
        load_dataset(spec(name="npz", data_dir=str(tmp_path / "empty.npz")))
    assert "empty.npz" in str(error.value)


def test_npz_labels_with_gaps_are_refused_unless_declared(tmp_path):
    """Labels {0, 5} used to make 6 classes silently, four of them empty."""
    images = np.zeros((4, 8, 8, 1), np.uint8)
    np.savez(tmp_path / "gaps.npz", images=images, labels=[0, 5, 5, 0])
    path = str(tmp_path / "gaps.npz")
    with pytest.raises(ValueError, match="classes 1, 2, 3, 4 have no examples") as error:
        load_dataset(spec(name="npz", data_dir=path))
    assert "gaps.npz" in str(error.value)
    kept = load_dataset(spec(name="npz", data_dir=path, classes=(0, 5)))
    assert kept.num_classes == 2 and kept.original_class_ids == (0, 5)
    np.savez(tmp_path / "named.npz", images=images, labels=[0, 5, 5, 0],
             class_names=np.array(list("abcdef")))
    declared = load_dataset(spec(name="npz", data_dir=str(tmp_path / "named.npz")))
    assert declared.num_classes == 6


def test_npz_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(spec(name="npz", data_dir=str(tmp_path / "none.npz")))


# --- image folder ---------------------------------------------------------------------


def test_image_folder_records_skipped_files(tmp_path):
    for name, value in (("ant", 10), ("bee", 250)):
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((5, 5, 3), value, np.uint8)).save(tmp_path / name / "0.png")
    (tmp_path / "bee" / "1.png").write_bytes(b"corrupt")
    with pytest.raises(ValueError, match="1.png"):
        load_dataset(spec(name="image_folder", data_dir=str(tmp_path)))
    loaded = load_dataset(spec(name="image_folder", data_dir=str(tmp_path), skip_corrupt=True))
    assert loaded.class_names == ("ant", "bee") and loaded.images.shape == (2, 8, 8, 1)
    assert loaded.num_skipped == 1 and loaded.skipped_files == (str(tmp_path / "bee" / "1.png"),)


# --- IDX via load_dataset -------------------------------------------------------------


@pytest.mark.skipif(not pathlib.Path(idx.DEBIAN_FASHION_MNIST_DIR).is_dir(),
                    reason="real Fashion-MNIST needs `apt-get install dataset-fashion-mnist`")
def test_real_fashion_mnist_from_debian_package():
    for split, size in (("train", 60000), ("test", 10000)):
        dataset = load_dataset(
            DataSpec(name="fashion_mnist", image_size=28, channels=1, split=split))
        assert dataset.images.shape == (size, 28, 28, 1)
        assert dataset.num_classes == 10 and dataset.class_names[9] == "Ankle boot"
        np.testing.assert_array_equal(dataset.class_counts(), np.full(10, size // 10))
        assert (dataset.images.min(), dataset.images.max()) == (0, 255)


def test_mnist_without_data_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_dataset(DataSpec(name="mnist", image_size=28, channels=1, cache_dir=str(tmp_path)))


# --- TFDS -----------------------------------------------------------------------------


def test_tfds_unprepared_dataset_gives_clear_error(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError, match="not prepared") as error:
        load_dataset(DataSpec(name="tfds:mnist", image_size=28, channels=1, data_dir=str(tmp_path)))
    assert str(tmp_path) in str(error.value) and "download=True" in str(error.value)
    with pytest.raises(ValueError, match="no dataset 'no_such_dataset_xyz'"):
        load_dataset(
            DataSpec(name="tfds:no_such_dataset_xyz", image_size=8, channels=1,
                     data_dir=str(tmp_path)))


@pytest.mark.parametrize("missing", ["tensorflow_datasets", "tensorflow"])
def test_tfds_without_the_extra_names_the_pip_command(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # the import fails, as on a lean install
    with pytest.raises(
            ValueError, match=r"'tfds:cifar10' needs TensorFlow Datasets.*"
            r"pip install 'jaxdpdm\[tfds\]'"):
        load_dataset(DataSpec(name="tfds:cifar10", image_size=32, channels=3))


def test_tfds_batches_are_shaped_and_labelled(monkeypatch):
    # A stand-in for a prepared builder: exercises the conversion without importing TF.
    label = types.SimpleNamespace(names=["no tumor", "tumor"])
    builder = types.SimpleNamespace(
        data_dir="/fake/patch_camelyon/2.0.0",
        info=types.SimpleNamespace(supervised_keys=("image", "label"), features={"label": label}))
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 256, (4, 12, 12, 3), dtype=np.uint8), np.array([0, 1, 1, 0])),
               (rng.integers(0, 256, (2, 12, 12, 3), dtype=np.uint8), np.array([1, 1]))]
    requested = []
    monkeypatch.setattr(sources, "_prepared_tfds_builder", lambda spec: builder)
    monkeypatch.setattr(sources, "_iterate_tfds_batches",
                        lambda b, split: requested.append(split) or iter(batches))
    dataset = load_dataset(
        DataSpec(name="tfds:patch_camelyon", image_size=6, channels=1, max_examples=5))
    assert requested == ["train[:5]"]
    assert dataset.images.shape == (5, 6, 6, 1) and dataset.class_names == ("no tumor", "tumor")
    np.testing.assert_array_equal(dataset.labels, [0, 1, 1, 0, 1])
    assert "TFDS /fake/patch_camelyon" in dataset.source
