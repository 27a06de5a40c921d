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

import numpy as np

from jaxdpdm.data import folder, idx, preprocessing
from jaxdpdm.data.dataset import TFDS_PREFIX, DataSpec, ImageDataset, source_kind

_TFDS_BATCH_SIZE = 1024


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


def _load_source(spec: DataSpec) -> ImageDataset:
    """The dataset as stored (native size and channels, except image folders)."""
    kind = source_kind(spec.name)
    if kind == "digits":
        return _load_digits(spec.split)
    if kind == "idx":
        info = idx.IDX_DATASETS[spec.name]
        images, labels, directory = idx.load_idx_split(info, spec.split, data_dir=spec.data_dir,
                                                       download=spec.download,
                                                       cache_dir=spec.cache_dir)
        return ImageDataset(images, labels, len(info.class_names), info.class_names, spec.name,
                            f"IDX files in {directory} (split {spec.split})")
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
    return ImageDataset(
        pixels[keep], labels[keep], 10, tuple(str(d) for d in range(10)), "digits",
        f"sklearn.datasets.load_digits (split {split}: every 5th "
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
            arrays = read_npz_archive(file)
        except (OSError, EOFError, zipfile.BadZipFile, ValueError) as error:
            # Only unreadable files may be skipped; readable ones with wrong contents
            # (below) always raise, since that is a pipeline bug rather than a bad file.
            if not spec.skip_corrupt:
                raise ValueError(f"cannot read {file}: {error}") from error
            skipped.append(str(file))
            continue
        file_images, file_labels, names = npz_contents(file, arrays)
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
    return ImageDataset(np.concatenate(images), labels, num_classes, class_names or
                        tuple(str(c) for c in range(num_classes)), spec.name,
                        f"npz {path} ({len(files)} file{'s' * (len(files) > 1)})",
                        num_skipped=len(skipped), skipped_files=tuple(skipped))


def _short_list(values, limit: int = 10) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... ({len(values) - limit} more)" if len(values) > limit else "")


def read_npz_archive(file: pathlib.Path) -> dict[str, np.ndarray]:
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


def npz_contents(file: pathlib.Path, arrays: dict[str, np.ndarray]):
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

    tfds_name = spec.name[len(TFDS_PREFIX):]
    try:
        builder = tfds.builder(tfds_name, data_dir=spec.data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(
            f"TFDS has no dataset {tfds_name!r} ({error.args[0].splitlines()[0]})") from error
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
    tfds = _import_tfds(f"{TFDS_PREFIX}{builder.name}")

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
    if (spec.max_examples is not None and spec.classes is None and spec.subset == "all" and
            "[" not in split):
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
