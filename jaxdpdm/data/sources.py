"""Dataset sources behind one entry point, `load_dataset(DataSpec) -> ImageDataset`.

Sources (`DataSpec.name`):

* "digits": scikit-learn's embedded 8x8 digits (1,797 images, no download). Pixel values
  0..16 are scaled to 0..255 (round(v * 255 / 16)). Split without randomness: within each
  class, in the order scikit-learn returns them, every 5th example (positions 4, 9, 14, ...)
  is "test" and the rest "train", i.e. a stratified 80/20 split that no library version can
  change.
* "fashion_mnist", "mnist": IDX files (`jaxdpdm.data.idx`): a local folder, the Debian
  package folder (Fashion-MNIST), or a SHA-256-verified download. Splits "train"/"test".
* "image_folder": `data_dir/<class>/<image>.png|jpg` (`jaxdpdm.data.folder`).
* "npz": `data_dir` is an `.npz` file or a folder whose `*.npz` files are concatenated in
  name order (e.g. the chunks written by sampling). Keys: "images" uint8 `[N, H, W, C]` or
  `[N, H, W]`, "labels" int `[N]`, optional "class_names".
* "tfds:<name>": any TFDS dataset with (image, label) supervised keys ("tfds:cifar10",
  "tfds:imagenet_resized/32x32", "tfds:patch_camelyon", ...).
image_folder and npz read exactly `data_dir` (no splits; point it at the test data instead).

After loading: public/private subset (`subset`), class filter (`classes`), the first
`max_examples`, then channel conversion and resizing (`jaxdpdm.data.preprocessing`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import zipfile
from typing import Any, Mapping

import numpy as np

from jaxdpdm.data import folder, idx, preprocessing

KNOWN_DATASETS = ("digits", "fashion_mnist", "mnist", "image_folder", "npz", "tfds:<name>")
_TFDS_PREFIX = "tfds:"
_TFDS_BATCH_SIZE = 1024
# Which optional DataSpec settings each kind of source understands; any other setting left
# at a non-default value is an error, so a misplaced option never passes silently.
_SOURCE_OPTIONS = {
    "digits": frozenset(),
    "idx": frozenset({"data_dir", "download", "cache_dir"}),
    "image_folder": frozenset({"data_dir", "skip_corrupt"}),
    "npz": frozenset({"data_dir", "skip_corrupt"}),
    "tfds": frozenset({"data_dir", "manual_dir", "download"}),
}
_OPTION_DEFAULTS = {"data_dir": None, "manual_dir": None, "download": False, "cache_dir": None,
                    "skip_corrupt": False}


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What to load and how to shape it.

    Attributes:
      name: one of KNOWN_DATASETS ("tfds:cifar10" etc. for TFDS).
      image_size: side S of the square output images.
      channels: 1 (grayscale) or 3 (RGB).
      split: "train"/"test" (digits, IDX), any TFDS split string ("train[:90%]");
        image_folder and npz have no splits and need the default "train".
      data_dir: IDX folder, image folder root, npz file/folder, or TFDS data_dir.
      manual_dir: TFDS manual_dir for datasets whose files must be fetched by hand.
      download: allow downloads (IDX: verified fetch into cache_dir; TFDS: prepare).
      cache_dir: IDX download cache (default ~/.cache/jaxdpdm/<name>).
      classes: keep only these classes (source label ints or class names), relabelled
        0..k-1 in the given order; None keeps all.
      skip_corrupt: leave out unreadable image/npz files (counted) instead of raising.
      max_examples: keep the first this many examples (source order, after filtering).
      public_fraction: share of each class put in the public part by `subset`.
      subset: "all", or "public"/"private" for the two disjoint parts of a stratified
        split drawn with split_seed (see `preprocessing.public_private_indices`).
      split_seed: seed of the public/private split.
    """
    name: str
    image_size: int
    channels: int
    split: str = "train"
    data_dir: str | None = None
    manual_dir: str | None = None
    download: bool = False
    cache_dir: str | None = None
    classes: tuple[int | str, ...] | None = None
    skip_corrupt: bool = False
    max_examples: int | None = None
    public_fraction: float = 0.0
    subset: str = "all"
    split_seed: int = 0

    def __post_init__(self):
        if self.classes is not None and not isinstance(self.classes, tuple):
            object.__setattr__(self, "classes", tuple(self.classes))  # lists from configs
        _validate_spec(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | Any) -> "DataSpec":
        """A spec from a mapping or a ConfigDict; unknown keys -> ValueError listing valid ones."""
        if hasattr(values, "to_dict"):
            values = values.to_dict()
        valid = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"unknown DataSpec keys {unknown}; valid keys are {valid}")
        missing = [key for key in ("name", "image_size", "channels") if key not in values]
        if missing:
            raise ValueError(f"DataSpec needs {missing}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain-python form (JSON-able) that `from_dict` accepts."""
        values = dataclasses.asdict(self)
        values["classes"] = list(self.classes) if self.classes is not None else None
        return values


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """Images and labels held in host memory.

    Attributes:
      images: uint8 `[N, H, W, C]`.
      labels: int32 `[N]` in [0, num_classes).
      num_classes: number of classes (models reserve label num_classes as "null").
      class_names: name of each label, length num_classes.
      name: the dataset name (DataSpec.name).
      source: where the data came from (path, URL or TFDS data_dir) and which split.
      num_skipped: unreadable files left out with skip_corrupt=True.
      skipped_files: their paths.
      original_class_ids: label i is the source's class original_class_ids[i]
        (range(num_classes) unless classes were filtered).
    """
    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    name: str
    source: str
    num_skipped: int = 0
    skipped_files: tuple[str, ...] = ()
    original_class_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        labels = np.asarray(self.labels)
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{self.name}: labels must be integers, got {labels.dtype}")
        object.__setattr__(self, "labels", labels.astype(np.int32, copy=False))
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"{self.name}: images must be uint8 [N, H, W, C], got "
                             f"{self.images.dtype} {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.name}: {self.images.shape[0]} images but labels have "
                             f"shape {self.labels.shape}")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_names)} class names for "
                             f"{self.num_classes} classes")
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise ValueError(f"{self.name}: labels must lie in [0, {self.num_classes}), got "
                             f"[{self.labels.min()}, {self.labels.max()}]")
        if self.original_class_ids is None:
            object.__setattr__(self, "original_class_ids", tuple(range(self.num_classes)))
        if len(self.original_class_ids) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.original_class_ids)} original class ids "
                             f"for {self.num_classes} classes")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C)."""
        return tuple(self.images.shape[1:])

    def class_counts(self) -> np.ndarray:
        """int64 `[num_classes]`: examples per class."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def subset(self, positions: np.ndarray) -> "ImageDataset":
        """The examples at `positions` (int `[M]`), everything else unchanged."""
        positions = np.asarray(positions, dtype=np.int64)
        return dataclasses.replace(self, images=self.images[positions],
                                   labels=self.labels[positions])

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """A training batch in the shared format.

        Args:
          indices: int `[B]` positions in this dataset (they become "index", the key of
            each example's randomness).

        Returns:
          {"image": f32 `[B, H, W, C]` in [-1, 1], "label": i32 `[B]`, "index": i32 `[B]`}.
        """
        indices = np.asarray(indices, dtype=np.int64)
        return {"image": preprocessing.to_model_range(self.images[indices]),
                "label": self.labels[indices],
                "index": indices.astype(np.int32)}

    def summary(self) -> str:
        """One paragraph for the start of a run: source, size, shape, range, classes."""
        height, width, channels = self.image_shape
        low, high = (int(self.images.min()), int(self.images.max())) if len(self) else (0, 0)
        counts = self.class_counts()
        shown = [f"{name}: {count}" for name, count in zip(self.class_names[:10], counts)]
        more = f", ... ({self.num_classes - 10} more)" if self.num_classes > 10 else ""
        text = (f"{self.name} from {self.source}: {len(self)} images {height}x{width}x"
                f"{channels} uint8, pixel range [{low}, {high}], {self.num_classes} classes "
                f"({', '.join(shown)}{more})")
        if self.original_class_ids != tuple(range(self.num_classes)):
            mapping = ", ".join(f"{old}->{new}" for new, old in enumerate(self.original_class_ids))
            text += f"; classes relabelled (source id->label): {mapping}"
        if self.num_skipped:
            text += f"; {self.num_skipped} unreadable files skipped"
        return text


def load_dataset(spec: DataSpec) -> ImageDataset:
    """Loads `spec.name`, then applies the subset, class filter, size limit and shaping.

    Returns:
      An ImageDataset with images uint8 `[N, image_size, image_size, channels]`.
    """
    dataset = _load_source(spec)
    if spec.subset != "all":
        # Split before filtering classes: the split then depends on source positions only,
        # so specs with different `classes` agree on which examples are public.
        public, private = preprocessing.split_public_private(dataset, spec.public_fraction,
                                                             seed=spec.split_seed)
        dataset = public if spec.subset == "public" else private
    if spec.classes is not None:
        dataset = preprocessing.filter_classes(dataset, spec.classes)
    if spec.max_examples is not None and len(dataset) > spec.max_examples:
        dataset = dataset.subset(np.arange(spec.max_examples))
    images = preprocessing.convert_channels(dataset.images, spec.channels)
    images = preprocessing.resize_images(images, spec.image_size)
    return dataclasses.replace(dataset, images=images)


def _source_kind(name: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"dataset name must be a string, got {name!r}")
    if name in idx.IDX_DATASETS:
        return "idx"
    if name in ("digits", "image_folder", "npz"):
        return name
    if name.startswith(_TFDS_PREFIX) and len(name) > len(_TFDS_PREFIX):
        return "tfds"
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(KNOWN_DATASETS)}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"DataSpec: {message}")


def _validate_spec(spec: DataSpec) -> None:
    """Raises ValueError for the first inconsistent DataSpec setting (checked in order)."""
    kind = _source_kind(spec.name)
    _check(_is_int(spec.image_size) and spec.image_size >= 1,
           f"image_size must be an int >= 1, got {spec.image_size!r}")
    _check(_is_int(spec.channels) and spec.channels in (1, 3),
           f"channels must be 1 or 3, got {spec.channels!r}")
    _check(spec.max_examples is None or (_is_int(spec.max_examples) and spec.max_examples >= 1),
           f"max_examples must be None or an int >= 1, got {spec.max_examples!r}")
    _check(spec.classes is None or (bool(spec.classes) and all(
        _is_int(c) or isinstance(c, str) for c in spec.classes)),
        f"classes must be None or a non-empty tuple of class ids or names, got {spec.classes!r}")
    _check(spec.subset in ("all", "public", "private"),
           f"subset must be 'all', 'public' or 'private', got {spec.subset!r}")
    _check(isinstance(spec.public_fraction, (int, float)) and not isinstance(
        spec.public_fraction, bool), f"public_fraction must be a number, got "
        f"{spec.public_fraction!r}")
    _check(spec.subset == "all" or 0.0 < spec.public_fraction < 1.0,
           f"subset={spec.subset!r} needs 0 < public_fraction < 1, got {spec.public_fraction}")
    _check(spec.subset != "all" or spec.public_fraction == 0.0,
           "public_fraction only applies with subset='public' or 'private'")
    _check(_is_int(spec.split_seed) and spec.split_seed >= 0,
           f"split_seed must be an int >= 0, got {spec.split_seed!r}")
    _check(kind not in ("digits", "idx") or spec.split in ("train", "test"),
           f"dataset {spec.name!r} has splits 'train' and 'test', got {spec.split!r}")
    if kind in ("image_folder", "npz"):
        _check(spec.data_dir is not None, f"dataset {spec.name!r} needs data_dir")
        _check(spec.split == "train", f"dataset {spec.name!r} has no splits (got split="
               f"{spec.split!r}); point data_dir at the data to load instead")
    for option, default in _OPTION_DEFAULTS.items():
        _check(getattr(spec, option) == default or option in _SOURCE_OPTIONS[kind],
               f"{option} does not apply to dataset {spec.name!r} (it understands "
               f"{sorted(_SOURCE_OPTIONS[kind]) or 'none'})")

def _load_source(spec: DataSpec) -> ImageDataset:
    """The dataset as stored (native size and channels, except image folders)."""
    kind = _source_kind(spec.name)
    if kind == "digits":
        return _load_digits(spec.split)
    if kind == "idx":
        info = idx.IDX_DATASETS[spec.name]
        images, labels, directory = idx.load_idx_split(
            info, spec.split, data_dir=spec.data_dir, download=spec.download,
            cache_dir=spec.cache_dir)
        return ImageDataset(images, labels, len(info.class_names), info.class_names,
                            spec.name, f"IDX files in {directory} (split {spec.split})")
    if kind == "image_folder":
        loaded = folder.load_image_folder(spec.data_dir, image_size=spec.image_size,
                                          channels=spec.channels, skip_corrupt=spec.skip_corrupt)
        return ImageDataset(loaded.images, loaded.labels, len(loaded.class_names),
                            loaded.class_names, spec.name, f"image folder {spec.data_dir}",
                            num_skipped=len(loaded.skipped_files),
                            skipped_files=loaded.skipped_files)
    if kind == "npz":
        return _load_npz(spec)
    return _load_tfds(spec)


def _load_digits(split: str) -> ImageDataset:
    from sklearn.datasets import load_digits  # scikit-learn is only needed for this source

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    is_test = np.zeros(labels.shape, dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        is_test[members[4::5]] = True
    keep = is_test if split == "test" else ~is_test
    return ImageDataset(pixels[keep], labels[keep], 10, tuple(str(d) for d in range(10)),
                        "digits", f"sklearn.datasets.load_digits (split {split}: every 5th "
                        "example of each class is test)")


def _load_npz(spec: DataSpec) -> ImageDataset:
    path = pathlib.Path(spec.data_dir)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise FileNotFoundError(f"npz folder {path} holds no *.npz files")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"npz data_dir {path} does not exist (expected an .npz file "
                                "with 'images' and 'labels' or a folder of them)")
    images, labels, skipped, class_names = [], [], [], None
    for file in files:
        try:
            arrays = _read_npz(file)
        except (OSError, EOFError, zipfile.BadZipFile, ValueError) as error:
            # Only unreadable files may be skipped; readable ones with wrong contents
            # (below) always raise, since that is a pipeline bug rather than a bad file.
            if not spec.skip_corrupt:
                raise ValueError(f"cannot read {file}: {error}") from error
            skipped.append(str(file))
            continue
        file_images, file_labels, names = _npz_contents(file, arrays)
        if names is not None and class_names is not None and names != class_names:
            raise ValueError(f"{file}: class_names {names} differ from the earlier files' "
                             f"{class_names}")
        if images and file_images.shape[1:] != images[0].shape[1:]:
            raise ValueError(f"{file}: images of shape {file_images.shape[1:]}, but {files[0]} "
                             f"has {images[0].shape[1:]}; the files of an npz folder must hold "
                             "images of one shape")
        class_names = class_names or names
        images.append(file_images)
        labels.append(file_labels)
    if not images:
        raise ValueError(f"npz data {path}: all {len(skipped)} files are unreadable")
    labels = np.concatenate(labels)
    if not labels.size:
        raise ValueError(f"npz data {path} holds 0 images")
    if class_names:
        num_classes = len(class_names)
        if labels.max() >= num_classes:
            raise ValueError(f"npz data {path}: label {labels.max()} but only {num_classes} "
                             f"class_names {list(class_names)}")
    else:
        num_classes = int(labels.max()) + 1
        missing = np.flatnonzero(np.bincount(labels, minlength=num_classes) == 0)
        if missing.size and spec.classes is None:
            raise ValueError(
                f"npz data {path}: labels run to {num_classes - 1} but classes "
                f"{_short_list(missing)} have no examples, which would make {num_classes} "
                f"classes; store 'class_names' in the file to declare empty classes, or set "
                f"data.classes to the labels to keep (they are relabelled 0..k-1)")
    return ImageDataset(np.concatenate(images), labels, num_classes,
                        class_names or tuple(str(c) for c in range(num_classes)), spec.name,
                        f"npz {path} ({len(files)} file{'s' * (len(files) > 1)})",
                        num_skipped=len(skipped), skipped_files=tuple(skipped))


def _short_list(values, limit: int = 10) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... ({len(values) - limit} more)" if len(values) > limit else "")


def _read_npz(file: pathlib.Path) -> dict[str, np.ndarray]:
    """The arrays of one .npz archive (a zip of .npy files).

    Raises:
      ValueError: the file is not an npz archive (np.load would call random bytes "pickled
        data"), or one of its arrays cannot be read.
    """
    with open(file, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        raise ValueError("this is a single .npy array, not an .npz archive with 'images' and "
                         "'labels' (write it with np.savez)")
    if not head.startswith(b"PK"):
        raise ValueError("not an .npz archive (no zip signature; empty, truncated or another "
                         "format)")
    with np.load(file, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def _npz_contents(file: pathlib.Path, arrays: dict[str, np.ndarray]):
    """(images uint8 [N, H, W, C], labels int32 [N], class names or None) of one npz file."""
    missing = [key for key in ("images", "labels") if key not in arrays]
    if missing:
        raise ValueError(f"{file}: missing keys {missing} (has {sorted(arrays)})")
    images, labels = arrays["images"], arrays["labels"]
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{file}: 'images' must be uint8 [N, H, W] or [N, H, W, 1|3], got "
                         f"{images.dtype} {images.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != images.shape[:1]:
        raise ValueError(f"{file}: 'labels' must be int [{images.shape[0]}], got "
                         f"{labels.dtype} {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{file}: 'labels' must be >= 0, found {labels.min()}")
    names = tuple(str(n) for n in arrays["class_names"]) if "class_names" in arrays else None
    return images, labels.astype(np.int32), names

TFDS_INSTALL = "pip install 'jaxdpdm[tfds]'"


def _import_tfds(dataset_name: str):
    """tensorflow_datasets, imported lazily (the package runs without TF); the `tfds` extra."""
    try:
        import tensorflow  # noqa: F401  (TFDS reads its files through TensorFlow)
        import tensorflow_datasets
    except ImportError as e:
        raise ValueError(f"data.name={dataset_name!r} needs TensorFlow Datasets, which this "
                         f"install lacks ({e.name or e}): {TFDS_INSTALL}") from e
    return tensorflow_datasets


def _prepared_tfds_builder(spec: DataSpec):
    """The TFDS builder for spec.name, prepared (downloading only if spec.download)."""
    tfds = _import_tfds(spec.name)

    tfds_name = spec.name[len(_TFDS_PREFIX):]
    try:
        builder = tfds.builder(tfds_name, data_dir=spec.data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(f"TFDS has no dataset {tfds_name!r} ({error.args[0].splitlines()[0]})"
                         ) from error
    if not builder.is_prepared():
        if not spec.download:
            raise FileNotFoundError(
                f"TFDS dataset {tfds_name!r} is not prepared in {builder.data_dir}. Prepare it "
                f"with `tfds build {tfds_name} --data_dir={builder.data_dir_root}` (add "
                "--manual_dir for datasets needing manual files), set data_dir to where it "
                "is prepared, or set download=True.")
        config = tfds.download.DownloadConfig(manual_dir=spec.manual_dir)
        builder.download_and_prepare(download_config=config)
    return builder


def _iterate_tfds_batches(builder, split: str):
    """Yields (images uint8 `[b, H, W, C]`, labels int `[b]`) numpy batches in file order."""
    tfds = _import_tfds(f"{_TFDS_PREFIX}{builder.name}")

    dataset = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    yield from tfds.as_numpy(dataset.batch(_TFDS_BATCH_SIZE))


def _load_tfds(spec: DataSpec) -> ImageDataset:
    builder = _prepared_tfds_builder(spec)
    supervised = builder.info.supervised_keys
    if not supervised or len(supervised) != 2:
        raise ValueError(f"TFDS dataset {spec.name!r} has no (image, label) supervised keys")
    label_feature = builder.info.features[supervised[1]]
    if not hasattr(label_feature, "names"):
        raise ValueError(f"TFDS dataset {spec.name!r}: label {supervised[1]!r} is not a "
                         "ClassLabel, so there are no classes")
    split = spec.split
    if (spec.max_examples is not None and spec.classes is None and spec.subset == "all"
            and "[" not in split):
        split = f"{split}[:{spec.max_examples}]"  # read only what will be kept
    images, labels = [], []
    for batch_images, batch_labels in _iterate_tfds_batches(builder, split):
        # Shape each batch now so that memory holds target-size images only (Camelyon
        # patches are 96x96, 9x the pixels of a 32x32 target).
        batch_images = preprocessing.convert_channels(np.asarray(batch_images, np.uint8),
                                                      spec.channels)
        images.append(preprocessing.resize_images(batch_images, spec.image_size))
        labels.append(np.asarray(batch_labels, dtype=np.int32))
    if not images:
        raise ValueError(f"TFDS dataset {spec.name!r} split {split!r} is empty")
    names = tuple(label_feature.names)
    return ImageDataset(np.concatenate(images), np.concatenate(labels), len(names), names,
                        spec.name, f"TFDS {builder.data_dir} (split {split})")
