"""Tests for jaxdpdm/data/idx.py on generated IDX files (and the real ones when installed)."""

import dataclasses
import gzip
import hashlib
import importlib.util
import pathlib
import struct
import urllib.error

import numpy as np
import pytest

from jaxdpdm.data import idx

DEBIAN_DIR = pathlib.Path(idx.DEBIAN_FASHION_MNIST_DIR)


def idx_bytes(array: np.ndarray) -> bytes:
    """Encodes `array` (uint8 or big-endian-able) as an IDX file."""
    type_codes = {np.dtype("u1"): 0x08, np.dtype("i4"): 0x0C, np.dtype("f8"): 0x0E}
    code = type_codes[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_split(directory, info, split, images, labels, *, compress=True):
    """Writes images/labels of `split` with the file names `info` expects."""
    directory.mkdir(parents=True, exist_ok=True)
    for remote, array in zip(info.files[split], (images, labels)):
        data = idx_bytes(array)
        name = remote.file_name if compress else remote.file_name.removesuffix(".gz")
        (directory / name).write_bytes(gzip.compress(data) if compress else data)


def tiny_split(seed, num=6):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (num, 28, 28), dtype=np.uint8), rng.integers(0, 10,
                                                                              num).astype(np.uint8))


@pytest.mark.parametrize("array", [
    np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
    np.array([5, 0, 9], dtype=np.uint8),
    np.array([[-7, 1 << 20]], dtype=np.int32),
    np.array([0.5, -2.25], dtype=np.float64),
])
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trips_raw_and_gzip(tmp_path, array, compress):
    data = idx_bytes(array)
    path = tmp_path / "file-idx"
    path.write_bytes(gzip.compress(data) if compress else data)
    decoded = idx.read_idx_file(path)
    assert decoded.dtype.isnative and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("data, message", [
    (b"\x00\x00", "only 2 bytes"),
    (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "not an IDX file"),
    (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "unknown IDX type"),
    (b"\x00\x00\x08\x00", "0 dimensions"),
    (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated IDX header"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 4) + b"\x00\x01\x02", "declares shape"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"\x00\x01", "declares shape"),
])
def test_malformed_idx_gives_error_naming_the_file(tmp_path, data, message):
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message) as error:
        idx.read_idx_file(path)
    assert str(path) in str(error.value)


def test_corrupt_gzip_gives_error_naming_the_file(tmp_path):
    path = tmp_path / "x-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(50, np.uint8)))[:-12])
    with pytest.raises(ValueError, match="corrupt gzip") as error:
        idx.read_idx_file(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("name", [
    "train-images-idx3-ubyte.gz", "train-images-idx3-ubyte", "train-images.idx3-ubyte",
    "train-images.idx3-ubyte.gz"
])
def test_find_idx_file_accepts_common_spellings(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    assert idx.find_idx_file(tmp_path, "train-images-idx3-ubyte.gz") == tmp_path / name
    assert idx.find_idx_file(tmp_path, "t10k-images-idx3-ubyte.gz") is None


@pytest.mark.parametrize("compress", [True, False])
def test_load_split_from_data_dir(tmp_path, compress):
    images, labels = tiny_split(0)
    write_split(tmp_path, idx.MNIST, "test", images, labels, compress=compress)
    loaded_images, loaded_labels, directory = idx.load_idx_split(idx.MNIST, "test",
                                                                 data_dir=str(tmp_path))
    assert loaded_images.shape == (6, 28, 28, 1) and loaded_labels.dtype == np.int32
    np.testing.assert_array_equal(loaded_images[..., 0], images)
    np.testing.assert_array_equal(loaded_labels, labels)
    assert directory == str(tmp_path)


def test_label_count_mismatch_is_an_error(tmp_path):
    images, labels = tiny_split(1)
    write_split(tmp_path, idx.MNIST, "train", images, labels[:-1])
    with pytest.raises(ValueError, match="expected 6 labels"):
        idx.load_idx_split(idx.MNIST, "train", data_dir=str(tmp_path))


def test_missing_data_gives_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        idx.load_idx_split(idx.MNIST, "train", data_dir=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="lacks"):
        idx.load_idx_split(idx.MNIST, "train", data_dir=str(tmp_path))
    no_package = dataclasses.replace(idx.FASHION_MNIST, system_dir=str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as error:
        idx.load_idx_split(no_package, "train", cache_dir=str(tmp_path / "cache"))
    assert "download=True" in str(error.value) and str(tmp_path / "cache") in str(error.value)
    with pytest.raises(ValueError, match="splits"):
        idx.load_idx_split(idx.MNIST, "validation", data_dir=str(tmp_path))


def mirror_info(tmp_path, seed=2):
    """An IdxDatasetInfo served from a file:// mirror, with the true digests."""
    mirror = tmp_path / "mirror"
    images, labels = tiny_split(seed)
    write_split(mirror, idx.MNIST, "train", images, labels)
    files = {
        "train": tuple(
            idx.RemoteFile(remote.file_name,
                           hashlib.sha256((mirror / remote.file_name).read_bytes()).hexdigest())
            for remote in idx.MNIST.files["train"])
    }
    info = idx.IdxDatasetInfo("mirror_mnist", mirror.as_uri() + "/", files, idx.MNIST.class_names)
    return info, images, labels


def test_download_from_file_url_verifies_and_caches(tmp_path):
    info, images, labels = mirror_info(tmp_path)
    cache = tmp_path / "cache"
    loaded, loaded_labels, directory = idx.load_idx_split(info, "train", download=True,
                                                          cache_dir=str(cache))
    assert directory == str(cache)
    np.testing.assert_array_equal(loaded[..., 0], images)
    np.testing.assert_array_equal(loaded_labels, labels)
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        remote.file_name for remote in info.files["train"])

    def no_network(url):
        raise AssertionError(f"cached files must not be fetched again: {url}")

    idx.load_idx_split(info, "train", download=True, cache_dir=str(cache), opener=no_network)


def test_download_with_wrong_digest_keeps_nothing(tmp_path):
    info, _, _ = mirror_info(tmp_path)
    images_file, labels_file = info.files["train"]
    tampered = dataclasses.replace(
        info, files={"train": (images_file, dataclasses.replace(labels_file, sha256="0" * 64))})
    cache = tmp_path / "cache"
    with pytest.raises(idx.ChecksumMismatchError, match="does not match"):
        idx.download_idx_dataset(tampered, cache, splits=("train",))
    assert not (cache / labels_file.file_name).exists()
    assert not list(cache.glob("*.part"))


def test_download_failure_says_what_to_do(tmp_path):

    def offline(url):
        raise urllib.error.URLError("network unreachable")

    with pytest.raises(OSError, match="data_dir") as error:
        idx.load_idx_split(idx.MNIST, "train", download=True, cache_dir=str(tmp_path),
                           opener=offline)
    assert idx.MNIST.base_url in str(error.value)


def _tfds_checksums(name):
    spec = importlib.util.find_spec("tensorflow_datasets")  # locates without importing TF
    if spec is None:
        return None
    path = pathlib.Path(spec.origin).parent / "url_checksums" / f"{name}.txt"
    if not path.is_file():
        return None
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    return {url: digest for url, _, digest, *_ in rows}


@pytest.mark.parametrize("info", [idx.FASHION_MNIST, idx.MNIST], ids=lambda info: info.name)
def test_digests_agree_with_tensorflow_datasets_checksums(info):
    listed = _tfds_checksums(info.name)
    if listed is None:
        pytest.skip("tensorflow_datasets url_checksums not installed")
    for pair in info.files.values():
        for remote in pair:
            assert listed[info.base_url + remote.file_name] == remote.sha256


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_digests_reproduce_from_debian_files():
    # Debian normalizes the gzip header (drops the file name, resets mtime) but keeps the
    # compressed stream; restoring the upstream header gives the official files byte for byte.
    upstream_mtime = {"train": 1504176606, "test": 1504176627}  # 2017-08-31 10:50 UTC
    for split, pair in idx.FASHION_MNIST.files.items():
        for remote in pair:
            debian = (DEBIAN_DIR / remote.file_name).read_bytes()
            assert debian[:4] == b"\x1f\x8b\x08\x00"
            original_name = remote.file_name.removesuffix(".gz").encode() + b"\x00"
            official = (b"\x1f\x8b\x08\x08" + struct.pack("<I", upstream_mtime[split]) +
                        b"\x00\x03" + original_name + debian[10:])
            assert hashlib.sha256(official).hexdigest() == remote.sha256
