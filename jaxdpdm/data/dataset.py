"""The types every data module shares: `DataSpec` (what to load) and `ImageDataset` (what was
loaded), with the validation of a spec against the sources that exist.

The source modules (`sources`, `folder`, `idx`) and `preprocessing` import this module; it
imports none of them but `idx` (for the names of the IDX datasets), so the package has no import
cycle.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from jaxdpdm.data import idx

KNOWN_DATASETS = ("digits", "fashion_mnist", "mnist", "image_folder", "npz", "tfds:<name>")
TFDS_PREFIX = "tfds:"
# Which optional DataSpec settings each kind of source understands; any other setting left
# at a non-default value is an error, so a misplaced option never passes silently.
_SOURCE_OPTIONS = {
    "digits": frozenset(),
    "idx": frozenset({"data_dir", "download", "cache_dir"}),
    "image_folder": frozenset({"data_dir", "skip_corrupt"}),
    "npz": frozenset({"data_dir", "skip_corrupt"}),
    "tfds": frozenset({"data_dir", "manual_dir", "download"}),
}
_OPTION_DEFAULTS = {
    "data_dir": None, "manual_dir": None, "download": False, "cache_dir": None,
    "skip_corrupt": False
}


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


def source_kind(name: str) -> str:
    """The source kind of dataset `name`: "digits", "idx", "image_folder", "npz" or "tfds"."""
    if not isinstance(name, str):
        raise ValueError(f"dataset name must be a string, got {name!r}")
    if name in idx.IDX_DATASETS:
        return "idx"
    if name in ("digits", "image_folder", "npz"):
        return name
    if name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX):
        return "tfds"
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(KNOWN_DATASETS)}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"DataSpec: {message}")


def _validate_spec(spec: DataSpec) -> None:
    """Raises ValueError for the first inconsistent DataSpec setting (checked in order)."""
    kind = source_kind(spec.name)
    _check(
        _is_int(spec.image_size) and spec.image_size >= 1,
        f"image_size must be an int >= 1, got {spec.image_size!r}")
    _check(
        _is_int(spec.channels) and spec.channels in (1, 3),
        f"channels must be 1 or 3, got {spec.channels!r}")
    _check(spec.max_examples is None or (_is_int(spec.max_examples) and spec.max_examples >= 1),
           f"max_examples must be None or an int >= 1, got {spec.max_examples!r}")
    _check(
        spec.classes is None or
        (bool(spec.classes) and all(_is_int(c) or isinstance(c, str) for c in spec.classes)),
        f"classes must be None or a non-empty tuple of class ids or names, got {spec.classes!r}")
    _check(spec.subset in ("all", "public", "private"),
           f"subset must be 'all', 'public' or 'private', got {spec.subset!r}")
    _check(
        isinstance(spec.public_fraction, (int, float)) and
        not isinstance(spec.public_fraction, bool), f"public_fraction must be a number, got "
        f"{spec.public_fraction!r}")
    _check(spec.subset == "all" or 0.0 < spec.public_fraction < 1.0,
           f"subset={spec.subset!r} needs 0 < public_fraction < 1, got {spec.public_fraction}")
    _check(spec.subset != "all" or spec.public_fraction == 0.0,
           "public_fraction only applies with subset='public' or 'private'")
    _check(
        _is_int(spec.split_seed) and spec.split_seed >= 0,
        f"split_seed must be an int >= 0, got {spec.split_seed!r}")
    _check(kind not in ("digits", "idx") or spec.split in ("train", "test"),
           f"dataset {spec.name!r} has splits 'train' and 'test', got {spec.split!r}")
    if kind in ("image_folder", "npz"):
        _check(spec.data_dir is not None, f"dataset {spec.name!r} needs data_dir")
        _check(
            spec.split == "train", f"dataset {spec.name!r} has no splits (got split="
            f"{spec.split!r}); point data_dir at the data to load instead")
    for option, default in _OPTION_DEFAULTS.items():
        _check(
            getattr(spec, option) == default or option in _SOURCE_OPTIONS[kind],
            f"{option} does not apply to dataset {spec.name!r} (it understands "
            f"{sorted(_SOURCE_OPTIONS[kind]) or 'none'})")
