"""MNIST-format (IDX) files: parser, local lookup, verified download.

IDX layout (big-endian): two zero bytes, a type code, the number of dimensions d, then d
uint32 sizes, then the values in row-major order. Files may be gzip-compressed; the gzip
magic bytes decide, not the file name.

Downloads are verified with SHA-256 before they are moved into the cache, because the
Fashion-MNIST host only serves plain http (an S3 website endpoint).

Provenance of the digests (no digest here is guessed):

* Fashion-MNIST: Debian's `dataset-fashion-mnist` ships the official `.gz` files with the
  gzip header normalized (original file name dropped, mtime reset); the compressed data is
  untouched. Restoring the header (file name, mtime 2017-08-31 10:50:06/10:50:27 UTC)
  reproduces files whose MD5 equals the MD5 table in the upstream README and whose SHA-256
  equals tensorflow_datasets' `url_checksums/fashion_mnist.txt`. A test redoes that
  reconstruction whenever the Debian package is installed.
* MNIST: the SHA-256 digests of the CVDF mirror that TFDS downloads from, as listed in
  tensorflow_datasets 4.9.10 `url_checksums/mnist.txt` (a test checks they still agree
  when TFDS is installed). No MNIST copy was available offline to recompute them.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pathlib
import urllib.request
from typing import Callable

import numpy as np

# IDX type code -> numpy dtype (big-endian, as stored).
_IDX_DTYPES = {
    0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")
}
_GZIP_MAGIC = b"\x1f\x8b"
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_DOWNLOAD_CHUNK_BYTES = 1 << 20


class ChecksumMismatchError(ValueError):
    """A downloaded file's SHA-256 differs from the expected digest."""


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One file of a remote dataset: `base_url + file_name` must hash to `sha256`."""
    file_name: str
    sha256: str


@dataclasses.dataclass(frozen=True)
class IdxDatasetInfo:
    """Where an IDX dataset lives and what it contains.

    Attributes:
      name: the dataset name used in `DataSpec.name`.
      base_url: download location, ending in "/".
      files: split -> (images file, labels file).
      class_names: label i is called class_names[i].
      system_dir: where an OS package installs the files, if one does.
      system_package: the command that installs that package.
    """
    name: str
    base_url: str
    files: dict[str, tuple[RemoteFile, RemoteFile]]
    class_names: tuple[str, ...]
    system_dir: str | None = None
    system_package: str | None = None


FASHION_MNIST = IdxDatasetInfo(
    name="fashion_mnist",
    base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    files={
        "train": (RemoteFile("train-images-idx3-ubyte.gz",
                             "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
                  RemoteFile("train-labels-idx1-ubyte.gz",
                             "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845")),
        "test": (RemoteFile("t10k-images-idx3-ubyte.gz",
                            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
                 RemoteFile("t10k-labels-idx1-ubyte.gz",
                            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5")),
    },
    class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot"),
    system_dir=DEBIAN_FASHION_MNIST_DIR,
    system_package="apt-get install dataset-fashion-mnist",
)

MNIST = IdxDatasetInfo(
    name="mnist",
    base_url="https://storage.googleapis.com/cvdf-datasets/mnist/",
    files={
        "train": (RemoteFile("train-images-idx3-ubyte.gz",
                             "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
                  RemoteFile("train-labels-idx1-ubyte.gz",
                             "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c")),
        "test": (RemoteFile("t10k-images-idx3-ubyte.gz",
                            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
                 RemoteFile("t10k-labels-idx1-ubyte.gz",
                            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6")),
    },
    class_names=tuple(str(digit) for digit in range(10)),
)

IDX_DATASETS = {info.name: info for info in (FASHION_MNIST, MNIST)}


def parse_idx(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Decodes the bytes of one (uncompressed) IDX file.

    Args:
      data: the raw file contents.
      source: a name for error messages (usually the file path).

    Returns:
      An array of the stored shape, in native byte order (uint8 for MNIST files).

    Raises:
      ValueError naming `source` when the header is malformed or the size is wrong.
    """
    if len(data) < 4:
        raise ValueError(f"{source}: not an IDX file: only {len(data)} bytes")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{source}: not an IDX file: header starts with {data[:2].hex()}, "
                         "expected 0000 (is it still compressed or a different format?)")
    type_code, num_dims = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{source}: unknown IDX type code 0x{type_code:02x}")
    if num_dims == 0:
        raise ValueError(f"{source}: IDX header declares 0 dimensions")
    header_bytes = 4 + 4 * num_dims
    if len(data) < header_bytes:
        raise ValueError(f"{source}: truncated IDX header ({len(data)} bytes, "
                         f"{num_dims} dimensions need {header_bytes})")
    shape = tuple(int(size) for size in np.frombuffer(data, ">u4", num_dims, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = header_bytes + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{source}: IDX header declares shape {shape} ({expected} bytes in "
                         f"total) but the file has {len(data)} bytes")
    values = np.frombuffer(data, dtype, offset=header_bytes).reshape(shape)
    return values.astype(dtype.newbyteorder("="))


def read_idx_file(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file, gzip-compressed or raw (decided by the magic bytes)."""
    path = pathlib.Path(path)
    data = path.read_bytes()
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise ValueError(f"{path}: corrupt gzip file: {error}") from error
    return parse_idx(data, source=str(path))


def find_idx_file(directory: str | os.PathLike, file_name: str) -> pathlib.Path | None:
    """Finds `file_name` in `directory`, accepting common spellings.

    For "train-images-idx3-ubyte.gz" this accepts the name with or without ".gz", and the
    "train-images.idx3-ubyte" spelling some mirrors use. Returns None when none exists.
    """
    stem = file_name.removesuffix(".gz")
    dotted = stem.replace("-idx", ".idx")
    for candidate in (stem + ".gz", stem, dotted + ".gz", dotted):
        path = pathlib.Path(directory) / candidate
        if path.is_file():
            return path
    return None


def fetch_verified(url: str, destination: str | os.PathLike, *, sha256: str,
                   opener: Callable = urllib.request.urlopen) -> pathlib.Path:
    """Downloads `url` to `destination`, keeping it only if its SHA-256 matches.

    The bytes go to "<destination>.part" first and are renamed into place after the digest
    check, so a cache never holds an unverified or half-written file.

    Args:
      url: any URL `opener` understands (http, https, file).
      destination: the final path.
      sha256: expected hex digest of the file.
      opener: `urllib.request.urlopen`-compatible; tests pass a fake.

    Raises:
      ChecksumMismatchError if the digest differs; OSError if the download fails.
    """
    destination = pathlib.Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    digest = hashlib.sha256()
    try:
        with opener(url) as response, open(partial, "wb") as out:
            while chunk := response.read(_DOWNLOAD_CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256.lower():
            raise ChecksumMismatchError(
                f"{url}: SHA-256 {digest.hexdigest()} does not match the expected {sha256}; "
                "the file was not kept (a corrupt download or a changed file)")
        os.replace(partial, destination)
    except OSError as error:
        raise OSError(f"download of {url} failed: {error}. Without network access, fetch "
                      f"the file elsewhere and pass its folder as data_dir.") from error
    finally:
        partial.unlink(missing_ok=True)
    return destination


def download_idx_dataset(info: IdxDatasetInfo, cache_dir: str | os.PathLike, *,
                         splits: tuple[str, ...] = ("train", "test"), base_url: str | None = None,
                         opener: Callable = urllib.request.urlopen) -> pathlib.Path:
    """Makes sure `cache_dir` holds verified copies of the files of `splits`.

    Files already in the cache are not fetched again (they were verified when written).
    `base_url` overrides `info.base_url` (e.g. a "file://" mirror); the digests still apply.

    Returns:
      The cache directory.
    """
    cache_dir = pathlib.Path(cache_dir)
    for split in splits:
        for remote in info.files[split]:
            destination = cache_dir / remote.file_name
            if not destination.is_file():
                fetch_verified((base_url or info.base_url) + remote.file_name, destination,
                               sha256=remote.sha256, opener=opener)
    return cache_dir


def default_cache_dir(name: str) -> pathlib.Path:
    """~/.cache/jaxdpdm/<name> (or $XDG_CACHE_HOME/jaxdpdm/<name>)."""
    root = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(root) / "jaxdpdm" / name


def load_idx_split(info: IdxDatasetInfo, split: str, *, data_dir: str | None = None,
                   download: bool = False, cache_dir: str | None = None,
                   opener: Callable = urllib.request.urlopen) -> tuple[np.ndarray, np.ndarray, str]:
    """Loads one split of an IDX dataset.

    Lookup order: `data_dir` if given (never downloaded into); else the cache if it already
    holds the split; else the OS package folder (Fashion-MNIST: Debian's); else a verified
    download into the cache if `download`; else FileNotFoundError saying how to get the data.

    Returns:
      (images uint8 `[N, H, W, 1]`, labels int32 `[N]`, the folder read from).
    """
    if split not in info.files:
        raise ValueError(f"{info.name} has splits {sorted(info.files)}, got split={split!r}")
    if data_dir is not None:
        directory = pathlib.Path(data_dir)
        _require_files(info, split, directory)
    else:
        cache = pathlib.Path(cache_dir) if cache_dir else default_cache_dir(info.name)
        system = pathlib.Path(info.system_dir) if info.system_dir else None
        if _has_files(info, split, cache):
            directory = cache
        elif system is not None and _has_files(info, split, system):
            directory = system
        elif download:
            directory = download_idx_dataset(info, cache, splits=(split,), opener=opener)
        else:
            looked_in = f"the cache {cache}" + (f" and {system}" if system else "")
            package_hint = (f"`{info.system_package}` (installs it under {system}), "
                            if info.system_package else "")
            raise FileNotFoundError(
                f"{info.name}: no IDX files for split {split!r} found (looked in {looked_in})."
                f" Get the data with {package_hint}download=True (fetches {info.base_url} "
                "with SHA-256 checks), or data_dir=<folder with the IDX files>.")
    images_file, labels_file = info.files[split]
    images_path = find_idx_file(directory, images_file.file_name)
    labels_path = find_idx_file(directory, labels_file.file_name)
    images, labels = read_idx_file(images_path), read_idx_file(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images [N, H, W], got "
                         f"{images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{labels_path}: expected {images.shape[0]} labels (one per image in "
                         f"{images_path}), got shape {labels.shape}")
    return images[..., None], labels.astype(np.int32), str(directory)


def _has_files(info: IdxDatasetInfo, split: str, directory: pathlib.Path) -> bool:
    return all(find_idx_file(directory, remote.file_name) for remote in info.files[split])


def _require_files(info: IdxDatasetInfo, split: str, directory: pathlib.Path) -> None:
    if not directory.is_dir():
        raise FileNotFoundError(f"{info.name}: data_dir {directory} does not exist")
    missing = [
        remote.file_name
        for remote in info.files[split]
        if find_idx_file(directory, remote.file_name) is None
    ]
    if missing:
        raise FileNotFoundError(
            f"{info.name}: {directory} lacks {missing} (gzip or raw IDX). Download them from "
            f"{info.base_url} or use download=True without data_dir.")
