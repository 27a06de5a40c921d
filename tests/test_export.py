"""Tests of jaxdpdm.export: the samples leave jaxdpdm exactly as they were drawn."""

import json

import jax
import numpy as np
import pytest

from jaxdpdm import export, sampling
from jaxdpdm.data import DataSpec, load_dataset
from jaxdpdm.data.folder import load_image_folder


def _cheap_sample_fn(key, labels):
    """Stand-in sampler: key- and label-dependent images in [-1, 1], no model."""
    noise = jax.random.uniform(key, (labels.shape[0], 4, 4, 1), minval=-1.0, maxval=1.0)
    return 0.5 * noise + 0.4 * (labels[:, None, None, None] - 1.0)


def test_image_folder_export_reads_back_exactly(tmp_path):
    sampling.generate_samples(_cheap_sample_fn, out_dir=tmp_path, num_samples=23, num_classes=11,
                              batch_size=8, seed=0, grid_per_class=0)
    images, labels = sampling.load_samples(tmp_path)
    folder = tmp_path / "export"
    assert export.export_image_folder(tmp_path, folder, num_classes=11) == 23
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert names == [f"{k:02d}" for k in range(11)]  # sorted names = label order
    loaded = load_image_folder(folder, image_size=images.shape[1], channels=images.shape[3])
    order = np.lexsort((np.arange(23), labels))  # the loader's (class, file name) order
    np.testing.assert_array_equal(loaded.labels, labels[order])
    np.testing.assert_array_equal(loaded.images, images[order])
    # Exporting again replaces the earlier export; a folder of someone else's files is refused.
    (folder / "00" / "stale.png").write_bytes(next((folder / "00").iterdir()).read_bytes())
    export.export_image_folder(tmp_path, folder, num_classes=11)
    assert not (folder / "00" / "stale.png").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        export.export_image_folder(tmp_path, tmp_path / "mine", num_classes=11)
    assert (tmp_path / "mine" / "keep.txt").exists()
    with pytest.raises(ValueError, match=r"no image of class\(es\) \[11, 12\]"):
        export.export_image_folder(tmp_path, tmp_path / "more", num_classes=13)


def test_npz_export_reads_back_through_the_npz_source(tmp_path):
    sampling.generate_samples(_cheap_sample_fn, out_dir=tmp_path, num_samples=23, num_classes=11,
                              batch_size=8, seed=0, grid_per_class=0)
    images, labels = sampling.load_samples(tmp_path)
    path = tmp_path / "out" / "synthetic.npz"
    assert export.export_npz(tmp_path, path, {"checkpoint_step": 7}) == 23
    loaded = load_dataset(
        DataSpec(name="npz", data_dir=str(path), image_size=images.shape[1],
                 channels=images.shape[3]))
    np.testing.assert_array_equal(loaded.images, images)
    np.testing.assert_array_equal(loaded.labels, labels)
    with np.load(path, allow_pickle=False) as archive:
        assert json.loads(str(archive["provenance"])) == {"checkpoint_step": 7}
    assert sorted(p.name for p in path.parent.iterdir()) == ["synthetic.npz"]  # no temp file
    with pytest.raises(ValueError, match="must end in .npz"):
        export.export_npz(tmp_path, tmp_path / "synthetic.zip")


def test_npz_folder_export_parts_read_back_as_one_dataset(tmp_path):
    sampling.generate_samples(_cheap_sample_fn, out_dir=tmp_path, num_samples=23, num_classes=11,
                              batch_size=8, seed=0, grid_per_class=0)
    images, labels = sampling.load_samples(tmp_path)
    folder = tmp_path / "published"
    assert export.export_npz_folder(tmp_path, folder, {"checkpoint_step": 7}, part_size=10) == 23
    parts = sorted(p.name for p in folder.glob("*.npz"))
    assert parts == ["part-00000.npz", "part-00001.npz", "part-00002.npz"]
    sizes = []
    for index, name in enumerate(parts):
        with np.load(folder / name, allow_pickle=False) as archive:
            sizes.append(len(archive["labels"]))
            assert json.loads(str(
                archive["provenance"])) == {"checkpoint_step": 7, "part": index, "num_parts": 3}
    assert sizes == [10, 10, 3]
    loaded = load_dataset(
        DataSpec(name="npz", data_dir=str(folder), image_size=images.shape[1],
                 channels=images.shape[3]))
    np.testing.assert_array_equal(loaded.images, images)
    np.testing.assert_array_equal(loaded.labels, labels)
    # A second export with fewer parts leaves no stale part behind; a foreign folder is refused.
    export.export_npz_folder(tmp_path, folder, part_size=23)
    assert sorted(p.name for p in folder.glob("*.npz")) == ["part-00000.npz"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="not empty"):
        export.export_npz_folder(tmp_path, tmp_path / "mine")
    assert (tmp_path / "mine" / "keep.npz").exists()
    with pytest.raises(ValueError, match="npz_part_size"):
        export.export_npz_folder(tmp_path, tmp_path / "new", part_size=0)


def _published_folder(tmp_path, provenance, num_samples=23, part_size=10):
    sampling.generate_samples(_cheap_sample_fn, out_dir=tmp_path, num_samples=num_samples,
                              num_classes=11, batch_size=8, seed=0, grid_per_class=0)
    export.export_npz_folder(tmp_path, tmp_path / "published", provenance, part_size=part_size)
    return tmp_path / "published"


def test_read_published_returns_the_set_and_its_shared_provenance(tmp_path):
    provenance = {"checkpoint_step": 7, "dataset": "digits", "privacy_guarantee": {"delta": 1e-5}}
    folder = _published_folder(tmp_path, provenance)
    images, labels = sampling.load_samples(tmp_path)
    # Part order, not name order: a renamed part still lands where its provenance says.
    (folder / "part-00000.npz").rename(folder / "part-00009.npz")
    read_images, read_labels, read_provenance = export.read_published(folder)
    np.testing.assert_array_equal(read_images, images)
    np.testing.assert_array_equal(read_labels, labels)
    assert read_provenance == provenance
    one_part = export.read_published(folder / "part-00001.npz")  # one file: as written
    np.testing.assert_array_equal(one_part[0], images[10:20])
    assert one_part[2] == {**provenance, "part": 1, "num_parts": 3}
    export.export_npz(tmp_path, tmp_path / "all.npz", provenance)
    assert export.read_published(tmp_path / "all.npz")[2] == provenance


def test_read_published_refuses_an_incomplete_or_mixed_set(tmp_path):
    folder = _published_folder(tmp_path, {"checkpoint_step": 7})
    spare = tmp_path / "spare.npz"
    (folder / "part-00002.npz").rename(spare)
    with pytest.raises(ValueError, match=r"holds parts \[0, 1\] of a set of 3: a part is missing"):
        export.read_published(folder)
    spare.rename(folder / "part-00002.npz")
    with np.load(folder / "part-00002.npz") as archive:  # the same part from another step
        np.savez(folder / "part-00002.npz", images=archive["images"], labels=archive["labels"],
                 provenance=json.dumps({"checkpoint_step": 8, "part": 2, "num_parts": 3}))
    with pytest.raises(ValueError, match="record different provenances"):
        export.read_published(folder)
    np.savez(tmp_path / "bare.npz", images=np.zeros((2, 4, 4, 1), np.uint8), labels=[0, 1])
    with pytest.raises(ValueError, match="has no provenance"):
        export.read_published(tmp_path / "bare.npz")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="cannot read"):
        export.read_published(tmp_path / "broken.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export.read_published(tmp_path / "nothing")
