"""An image collection stored as one sub-folder per class.

    root/
      cat/ 001.png 002.jpg ...
      dog/ a.jpeg ...

Class names are the sorted sub-folder names (label i = i-th name), so the labelling does
not depend on the file system's listing order. Hidden entries (".DS_Store", ".git") and
files whose extension is not PNG/JPEG are ignored. Every image is converted to the
requested channel count with PIL (palette -> RGB/L through its palette; RGB -> L uses PIL's
luma), center-cropped to a square and resized with the rule in
`jaxdpdm.data.preprocessing`.

Pixel formats (PIL modes): 8-bit ones ("1", "L", "P", "RGB", "CMYK", "YCbCr") convert
directly. 16-bit grayscale ("I;16*", and "I" from a 16-bit PNG) is scaled to 0..255 by
round(v * 255 / 65535), not clipped (PIL itself reduces 16-bit RGB PNGs to their high
byte). An alpha channel ("LA", "PA", "RGBA", a palette or gray image with a transparent
colour) is dropped when every pixel is opaque; an image with transparent pixels is
refused, since the colour under them is undefined (flatten it onto a background first).
Floating-point ("F") and other 32-bit integer images have no standard range and are
refused. Refused and unreadable images both raise `ValueError` naming the file (or are
skipped and counted with skip_corrupt=True).
"""

from __future__ import annotations

import dataclasses
import pathlib
import warnings

import numpy as np
from PIL import Image

from jaxdpdm.data import preprocessing

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


@dataclasses.dataclass(frozen=True, eq=False)
class FolderImages:
    """What `load_image_folder` read.

    Attributes:
      images: uint8 `[N, S, S, C]`.
      labels: int32 `[N]`, indices into `class_names`.
      class_names: sorted sub-folder names.
      skipped_files: unreadable files left out (only with skip_corrupt=True).
    """
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    skipped_files: tuple[str, ...]


def list_image_files(root: str | pathlib.Path) -> tuple[tuple[str, ...], list[list[pathlib.Path]]]:
    """Lists the class folders of `root` and the image files in each (both sorted).

    Raises:
      FileNotFoundError if `root` is not a directory; ValueError if it has no class
      sub-folders or a class folder holds no image file.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder {root} does not exist (expected {root}/<class name>/<image>.png)")
    class_dirs = sorted(
        (entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")),
        key=lambda entry: entry.name)
    if not class_dirs:
        raise ValueError(f"image folder {root} has no class sub-folders; expected "
                         f"{root}/<class name>/<image>.png")
    files_per_class = []
    for class_dir in class_dirs:
        files = sorted(entry for entry in class_dir.iterdir() if entry.is_file() and
                       not entry.name.startswith(".") and entry.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"class folder {class_dir} holds no {'/'.join(IMAGE_EXTENSIONS)} "
                             "files; remove it or add images")
        files_per_class.append(files)
    return tuple(class_dir.name for class_dir in class_dirs), files_per_class


def to_8bit(image: Image.Image) -> Image.Image:
    """`image` in a PIL mode with 8 bits per channel and no alpha (rules in the module docstring).

    Raises:
      ValueError: floating-point or out-of-range integer pixels, or transparent pixels.
    """
    mode = image.mode
    if mode.startswith("I;16") or (mode == "I" and image.format == "PNG"):
        # 16-bit grayscale (Pillow opens 16-bit PNGs as "I;16", older versions as "I").
        levels = np.asarray(image).astype(np.int64)
        if levels.min() < 0 or levels.max() > 65535:
            raise ValueError(f"mode {mode} pixels outside the 16-bit range 0..65535")
        return Image.fromarray(((levels * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    if mode in ("I", "F"):
        kind = "floating-point" if mode == "F" else "32-bit integer"
        raise ValueError(f"{kind} pixels (mode {mode}) have no standard range; save the image "
                         "as 8- or 16-bit PNG or as JPEG")
    if mode in ("LA", "La", "PA", "RGBA", "RGBa") or image.has_transparency_data:
        with_alpha = image.convert("RGBA" if mode not in ("LA", "La") else "LA")
        alpha = np.asarray(with_alpha)[..., -1]
        if alpha.min() < 255:
            raise ValueError(f"{int((alpha < 255).sum())} of {alpha.size} pixels are "
                             f"transparent (mode {mode}), and the colour under them is undefined; "
                             "flatten the image onto a background first")
        return with_alpha.convert("L" if with_alpha.mode == "LA" else "RGB")
    return image


def read_image(path: pathlib.Path, *, image_size: int, channels: int) -> np.ndarray:
    """Decodes one image file to uint8 `[image_size, image_size, channels]`.

    Raises:
      ValueError naming `path` when the file cannot be decoded (corrupt, truncated or not
      an image).
    """
    mode = {1: "L", 3: "RGB"}[channels]
    try:
        with warnings.catch_warnings():
            # A decompression-bomb *warning* becomes an error: a huge image in a private
            # collection is more likely a broken file than something to resize silently.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()  # PIL decodes lazily; force it so truncation shows up here.
                converted = to_8bit(image).convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    resized = preprocessing.crop_and_resize_pil(converted, image_size)
    return np.asarray(resized, dtype=np.uint8).reshape(image_size, image_size, channels)


def load_image_folder(root: str | pathlib.Path, *, image_size: int, channels: int,
                      skip_corrupt: bool = False) -> FolderImages:
    """Reads every image under `root` (layout in the module docstring).

    Args:
      root: the folder holding one sub-folder per class.
      image_size: output side length S.
      channels: 1 (grayscale) or 3 (RGB).
      skip_corrupt: if True, unreadable files are left out and listed in `skipped_files`;
        if False, the first one raises.

    Returns:
      A `FolderImages` with images uint8 `[N, S, S, C]` in (class, file name) order.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    class_names, files_per_class = list_image_files(root)
    images, labels, skipped = [], [], []
    for label, files in enumerate(files_per_class):
        for path in files:
            try:
                images.append(read_image(path, image_size=image_size, channels=channels))
            except ValueError:
                if not skip_corrupt:
                    raise
                skipped.append(str(path))
                continue
            labels.append(label)
    if not images:
        raise ValueError(f"image folder {root}: all {len(skipped)} image files are unreadable")
    return FolderImages(images=np.stack(images), labels=np.asarray(labels, dtype=np.int32),
                        class_names=class_names, skipped_files=tuple(skipped))
