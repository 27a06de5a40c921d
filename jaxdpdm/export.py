"""Exporting the samples of `WORKDIR/samples/` for use outside jaxdpdm.

Three formats, each written by `--mode=sample` when configured (`sample.npz_file`,
`sample.npz_folder`, `sample.image_folder`): one compressed `.npz` (the layout the "npz" dataset
source reads), a folder of such `.npz` parts (for sets too large for one file under a size limit;
the "npz" source reads the folder as one dataset), and an image folder of PNGs (the layout the
"image_folder" source and torchvision's `ImageFolder` read). `read_published` reads a `.npz` set
back with its provenance, checking that no part of a folder is missing (`--mode=evaluate` with
`eval.samples_npz`).
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import shutil
import zipfile

import numpy as np
from PIL import Image

from jaxdpdm.data.sources import npz_contents, read_npz_archive
from jaxdpdm.sampling import load_samples

EXPORT_MARKER = ".jaxdpdm_export.json"


def _write_npz(path: str, images: np.ndarray, labels: np.ndarray, provenance: dict) -> None:
    """One compressed `.npz` (`images`, int32 `labels`, `provenance` JSON), written to a temporary
    name and renamed, so a crash leaves either the old file or the new one."""
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    try:
        np.savez_compressed(tmp, images=images, labels=labels.astype(np.int32),
                            provenance=np.array(json.dumps(provenance, sort_keys=True)))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export_npz(out_dir: str | os.PathLike, path: str | os.PathLike,
               provenance: dict | None = None) -> int:
    """Writes the samples of `out_dir/samples/` to one compressed `.npz`; returns their number.

    The file holds `images` uint8 `[N, H, W, C]` and `labels` int32 `[N]` (the layout the "npz"
    dataset source reads, so the file can be re-evaluated or trained on as it is), and
    `provenance`, a JSON string (e.g. the checkpoint step and the privacy guarantee of the model
    that drew them). A crash leaves either the old file or the new one.
    """
    images, labels = load_samples(out_dir)
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not path.endswith(".npz"):
        raise ValueError(f"sample.npz_file must end in .npz, got {path}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write_npz(path, images, labels, provenance or {})
    return int(len(images))


def export_npz_folder(out_dir: str | os.PathLike, folder: str | os.PathLike,
                      provenance: dict | None = None, part_size: int = 10000) -> int:
    """Writes the samples of `out_dir/samples/` as `folder/part-00000.npz`, `part-00001.npz`, ...
    of at most `part_size` samples each, in sample order; returns their number.

    For publishing a set too large for one file under a size limit: each part has the layout of
    `export_npz` (its `provenance` adds `part` and `num_parts`), and the "npz" dataset source reads
    the folder back as one dataset (parts concatenated in name order = sample order). The folder
    is prepared like `export_image_folder`'s: an earlier export is replaced, any other non-empty
    folder refused.
    """
    if int(part_size) != part_size or part_size < 1:
        raise ValueError(f"sample.npz_part_size must be a positive integer, got {part_size}")
    folder = os.path.abspath(os.path.expanduser(os.fspath(folder)))
    images, labels = load_samples(out_dir)
    num_parts = -(-len(images) // part_size)
    _prepare_export_folder(
        folder, {
            "samples": os.path.join(os.path.abspath(os.fspath(out_dir)), "samples"),
            "num_images": int(len(images)), "num_parts": num_parts
        })
    width = max(5, len(str(num_parts - 1)))
    for part in range(num_parts):
        rows = slice(part * part_size, (part + 1) * part_size)
        _write_npz(os.path.join(folder, f"part-{part:0{width}d}.npz"), images[rows], labels[rows],
                   {**(provenance or {}), "part": part, "num_parts": num_parts})
    return int(len(images))


def read_published(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """Reads a set written by `export_npz` (one file) or `export_npz_folder` (a folder of parts).

    Returns:
      (images uint8 [N, H, W, C], labels int32 [N], provenance): for a folder, the parts in
      part order and the provenance they share (without the per-part "part" and "num_parts");
      for one file, its provenance as written (one part of a folder keeps its "part" and
      "num_parts", so a report shows that it holds only part of the set).

    Raises:
      FileNotFoundError: `path` does not exist, or is a folder without `.npz` files.
      ValueError: a file is unreadable or has no provenance (not written by these exports),
        the parts' provenances differ (parts of different runs), or a part is missing or
        duplicated (the numbers must be exactly 0 .. num_parts - 1).
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.npz")))
        if not files:
            raise FileNotFoundError(f"{path} holds no .npz files")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"{path} does not exist (expected an .npz file written by "
                                "sample.npz_file or a folder written by sample.npz_folder)")
    parts = []
    for file in files:
        try:
            arrays = read_npz_archive(pathlib.Path(file))
        except (OSError, EOFError, zipfile.BadZipFile, ValueError) as error:
            raise ValueError(f"cannot read {file}: {error}") from error
        images, labels, _ = npz_contents(pathlib.Path(file), arrays)
        if "provenance" not in arrays:
            raise ValueError(f"{file} has no provenance, so it was not written by --mode=sample "
                             "(sample.npz_file / npz_folder); evaluate it with your own "
                             "classifier, or train on it as the npz data source")
        parts.append((images, labels, json.loads(str(arrays["provenance"]))))
    if not os.path.isdir(path):
        return parts[0]
    shared = [{k: v for k, v in p.items() if k not in ("part", "num_parts")} for *_, p in parts]
    if any(s != shared[0] for s in shared[1:]):
        raise ValueError(f"the files in {path} record different provenances (checkpoint step, "
                         "sampler or privacy guarantee): they are not one published set")
    numbers = sorted(p.get("part", -1) for *_, p in parts)
    expected = parts[0][2].get("num_parts")
    if numbers != list(range(expected if isinstance(expected, int) else -1)):
        raise ValueError(f"{path} holds parts {numbers} of a set of {expected}: a part is "
                         "missing, duplicated or not from sample.npz_folder")
    parts.sort(key=lambda part: part[2]["part"])
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            shared[0])


def _prepare_export_folder(folder: str, record: dict) -> None:
    """Empties `folder` if it holds an earlier jaxdpdm export (its marker file), refuses it if it
    holds anything else, then creates it with a fresh marker recording `record`."""
    marker = os.path.join(folder, EXPORT_MARKER)
    if os.path.isdir(folder) and os.listdir(folder):
        if not os.path.exists(marker):
            raise ValueError(f"{folder} is not empty and holds no earlier jaxdpdm export; give "
                             "a new or empty folder")
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(folder, exist_ok=True)
    with open(marker, "w") as f:
        json.dump(record, f)


def export_image_folder(out_dir: str | os.PathLike, folder: str | os.PathLike,
                        num_classes: int) -> int:
    """Writes the samples of `out_dir/samples/` as PNGs in an image folder; returns their number.

    The layout is the one `jaxdpdm.data.folder` (and e.g. torchvision's `ImageFolder`) reads:
    `folder/<label>/<sample index>.png`, class folders named by the zero-padded label so that
    their sorted order gives back the labels, files numbered by sample index. Grayscale samples
    are 8-bit grayscale PNGs, RGB samples RGB PNGs: reading them back at the same size and
    channel count gives exactly the sampled pixels. A hidden marker file records the export; a
    folder that holds one (an earlier export) is emptied and rewritten, any other non-empty
    folder is refused, so nothing of the user's is ever deleted.

    Raises:
      ValueError: `folder` is not empty and was not written here, or a class has no sample
        (the loader would renumber the classes after it).
    """
    folder = os.path.abspath(os.path.expanduser(os.fspath(folder)))
    images, labels = load_samples(out_dir)
    missing = sorted(set(range(num_classes)) - set(np.unique(labels).tolist()))
    if missing:
        raise ValueError(f"the samples hold no image of class(es) {missing[:5]}: an image folder "
                         "needs every class; sample at least one image per class")
    _prepare_export_folder(
        folder, {
            "samples": os.path.join(os.path.abspath(os.fspath(out_dir)), "samples"),
            "num_images": int(len(images)), "num_classes": int(num_classes)
        })
    class_width = len(str(max(num_classes - 1, 0)))
    index_width = max(5, len(str(len(images) - 1)))
    for label in range(num_classes):
        os.makedirs(os.path.join(folder, f"{label:0{class_width}d}"), exist_ok=True)
    for index, (image, label) in enumerate(zip(images, labels)):
        pixels = image[..., 0] if image.shape[-1] == 1 else image
        Image.fromarray(pixels).save(
            os.path.join(folder, f"{int(label):0{class_width}d}", f"{index:0{index_width}d}.png"))
    return int(len(images))
