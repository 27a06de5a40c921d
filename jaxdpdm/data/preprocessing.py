"""Preprocessing: resizing, channel conversion, class filtering, splits.

Everything here is a pure numpy/PIL function of its arguments. `filter_classes` and
`split_public_private` take and return `ImageDataset`s (defined in `jaxdpdm.data.dataset`);
the rest works on arrays.

Resizing rule (one rule for every source, so the same picture gives the same pixels
whether it came from a folder, an `.npz` file or TFDS):

* a non-square image is first center-cropped to a square (no aspect distortion);
* downsampling uses PIL's BOX filter: each output pixel is the area average of the input
  pixels it covers, the usual choice for downsampled datasets such as ImageNet 32x32;
* upsampling (e.g. the 8x8 digits to 16x16) uses PIL's BILINEAR filter, which interpolates
  smoothly instead of repeating pixels in blocks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct

import numpy as np
from PIL import Image

from jaxdpdm.data.dataset import ImageDataset

# PIL's "L" conversion weights (ITU-R 601-2 luma) in 16-bit fixed point. Using the same
# integer formula as PIL makes array conversion match `Image.convert("L")` bit for bit.
_LUMA_WEIGHTS_FIXED_POINT = (19595, 38470, 7471)


def crop_and_resize_pil(image: Image.Image, image_size: int) -> Image.Image:
    """Center-crops `image` to a square and resizes it to `image_size` x `image_size`.

    BOX (area average) when shrinking, BILINEAR when enlarging; see the module docstring.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    width, height = image.size
    if width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    side = image.size[0]
    if side == image_size:
        return image
    resample = Image.Resampling.BOX if side > image_size else Image.Resampling.BILINEAR
    return image.resize((image_size, image_size), resample=resample)


def resize_images(images: np.ndarray, image_size: int) -> np.ndarray:
    """Resizes a batch of images with `crop_and_resize_pil`.

    Args:
      images: uint8 `[N, H, W, C]` with C in {1, 3}.
      image_size: output side length S.

    Returns:
      uint8 `[N, S, S, C]`; the input itself when it already has that shape.
    """
    _check_image_batch(images)
    num, height, width, channels = images.shape
    if height == width == image_size:
        return images
    out = np.empty((num, image_size, image_size, channels), dtype=np.uint8)
    for i in range(num):
        # PIL's 1-channel mode "L" wants a 2-D array; RGB wants [H, W, 3].
        pixels = images[i, :, :, 0] if channels == 1 else images[i]
        resized = np.asarray(crop_and_resize_pil(Image.fromarray(pixels), image_size))
        out[i] = resized.reshape(image_size, image_size, channels)
    return out


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Converts uint8 `[N, H, W, C]` images between grayscale (C=1) and RGB (C=3).

    1 -> 3 repeats the gray value; 3 -> 1 takes PIL's luma L = (299 R + 587 G + 114 B) / 1000
    with PIL's rounding, so it matches images converted with `Image.convert("L")`.

    Returns:
      uint8 `[N, H, W, channels]`; the input itself when it already has that many channels.
    """
    _check_image_batch(images)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    have = images.shape[-1]
    if have == channels:
        return images
    if have == 1:
        return np.repeat(images, 3, axis=-1)
    weights = np.asarray(_LUMA_WEIGHTS_FIXED_POINT, dtype=np.uint32)
    luma = (images.astype(np.uint32) @ weights + 0x8000) >> 16
    return luma.astype(np.uint8)[..., None]


def select_classes(labels: np.ndarray, keep: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Keeps the examples whose label is in `keep` and relabels them 0..k-1.

    The new label of an example is the position of its old label in `keep`, so the caller
    chooses the order (`keep=(7, 2)` maps 7 -> 0 and 2 -> 1).

    Args:
      labels: int `[N]`.
      keep: k distinct source labels.

    Returns:
      (positions int64 `[M]` of the kept examples in source order, new labels int32 `[M]`).
    """
    keep = tuple(int(label) for label in keep)
    if not keep:
        raise ValueError("select_classes needs at least one class to keep")
    if len(set(keep)) != len(keep):
        raise ValueError(f"classes to keep must be distinct, got {keep}")
    labels = np.asarray(labels)
    lookup = {old: new for new, old in enumerate(keep)}
    positions = np.flatnonzero(np.isin(labels, keep))
    new_labels = np.asarray([lookup[int(old)] for old in labels[positions]], dtype=np.int32)
    return positions, new_labels


def split_order_keys(num_examples: int, seed: int) -> np.ndarray:
    """uint64 `[num_examples]` pseudo-random keys, key i = BLAKE2b-64 of (seed, i).

    A hash, not a numpy RNG stream: numpy does not promise that `Generator` streams stay
    the same across versions, and a split that changed between a non-private pretraining
    run on the public part and a later DP run on the private part would put examples
    used without privacy into the private part.
    """
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return np.fromiter((int.from_bytes(
        hashlib.blake2b(struct.pack("<QQ", seed, i), digest_size=8).digest(), "little")
                        for i in range(num_examples)), dtype=np.uint64, count=num_examples)


def public_private_indices(labels: np.ndarray, public_fraction: float, *,
                           seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits example positions into disjoint public and private parts, stratified by label.

    Within each class, the floor(public_fraction * n_class + 1/2) members with the smallest
    `split_order_keys` go to the public part, the rest to the private part. A class's split
    depends only on the seed and its members' positions, not on the other classes.

    Args:
      labels: int `[N]`.
      public_fraction: in (0, 1).
      seed: the split seed; the same seed gives the same split on every platform.

    Returns:
      (public positions int64 `[P]`, private positions int64 `[N - P]`), each sorted.
    """
    if not 0.0 < public_fraction < 1.0:
        raise ValueError(f"public_fraction must be in (0, 1), got {public_fraction}")
    labels = np.asarray(labels)
    keys = split_order_keys(labels.shape[0], int(seed))
    is_public = np.zeros(labels.shape, dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        ranked = members[np.argsort(keys[members], kind="stable")]
        num_public = int(np.floor(public_fraction * members.size + 0.5))  # half rounds up
        is_public[ranked[:num_public]] = True
    return np.flatnonzero(is_public).astype(np.int64), np.flatnonzero(~is_public).astype(np.int64)


def filter_classes(dataset: ImageDataset, classes: tuple[int | str, ...]) -> ImageDataset:
    """Keeps `classes` (label ids or class names), relabelled 0..k-1 in the given order.

    The result's `original_class_ids` records the mapping (new label i <- source class
    original_class_ids[i]) so reports can show it.
    """
    keep = []
    for entry in classes:
        if isinstance(entry, str):
            if entry not in dataset.class_names:
                raise ValueError(f"{dataset.name} has no class {entry!r}; classes are "
                                 f"{list(dataset.class_names)}")
            keep.append(dataset.class_names.index(entry))
        elif 0 <= int(entry) < dataset.num_classes:
            keep.append(int(entry))
        else:
            raise ValueError(f"{dataset.name}: class id {entry} outside [0, "
                             f"{dataset.num_classes})")
    positions, new_labels = select_classes(dataset.labels, tuple(keep))
    return dataclasses.replace(
        dataset, images=dataset.images[positions], labels=new_labels, num_classes=len(keep),
        class_names=tuple(dataset.class_names[i] for i in keep),
        original_class_ids=tuple(dataset.original_class_ids[i] for i in keep))


def split_public_private(dataset: ImageDataset, public_fraction: float, *,
                         seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Disjoint (public, private) parts of `dataset`; see `public_private_indices`."""
    public, private = public_private_indices(dataset.labels, public_fraction, seed=seed)
    how = f"public_fraction={public_fraction}, seed={seed}"
    return tuple(
        dataclasses.replace(dataset.subset(positions),
                            source=f"{dataset.source} [{part} part, {how}]")
        for part, positions in (("public", public), ("private", private)))


def _check_image_batch(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        described = getattr(images, "shape", None), getattr(images, "dtype", type(images))
        raise ValueError(f"expected uint8 images [N, H, W, C], got shape/dtype {described}")
    if images.shape[-1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got shape {images.shape}")
