"""Tests for jaxdpdm/data/folder.py on a few generated PNG/JPEG files."""

import io

import numpy as np
import pytest
from PIL import Image

from jaxdpdm.data import folder


def save(path, array, mode, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path, format=fmt)


@pytest.fixture
def collection(tmp_path):
    """root/{bird,cat,dog}: 5 readable images of assorted modes, sizes and formats."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    save(root / "dog" / "b.png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), "RGB")
    save(root / "dog" / "a.jpg", rng.integers(0, 256, (16, 10, 3), dtype=np.uint8), "RGB", "JPEG")
    save(root / "cat" / "x.PNG", np.full((6, 6), 40, np.uint8), "L")
    save(root / "cat" / "y.png", np.full((4, 4, 4), 200, np.uint8), "RGBA")
    save(root / "bird" / "z.jpeg", np.full((9, 9, 3), 90, np.uint8), "RGB", "JPEG")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.png").write_bytes(b"ignored")
    (root / ".thumbnails").mkdir()
    return root


@pytest.mark.parametrize("channels", [1, 3])
def test_loads_sorted_classes_resized(collection, channels):
    loaded = folder.load_image_folder(collection, image_size=8, channels=channels)
    assert loaded.class_names == ("bird", "cat", "dog")
    assert loaded.images.shape == (5, 8, 8, channels) and loaded.images.dtype == np.uint8
    np.testing.assert_array_equal(loaded.labels, [0, 1, 1, 2, 2])
    assert loaded.skipped_files == ()
    # Constant images stay constant through conversion and resizing (x.PNG is gray 40).
    assert np.all(loaded.images[1] == 40)


def test_corrupt_image_error_names_the_file(collection):
    broken = collection / "dog" / "c.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="cannot read image") as error:
        folder.load_image_folder(collection, image_size=8, channels=3)
    assert str(broken) in str(error.value)


def test_skip_corrupt_counts_unreadable_and_truncated_files(collection):
    (collection / "dog" / "c.png").write_bytes(b"not a png at all")
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8) + 7, "RGB").save(buffer, format="PNG")
    (collection / "bird" / "truncated.png").write_bytes(buffer.getvalue()[:60])
    loaded = folder.load_image_folder(collection, image_size=8, channels=3, skip_corrupt=True)
    assert len(loaded.images) == 5
    assert sorted(loaded.skipped_files) == sorted(
        [str(collection / "dog" / "c.png"), str(collection / "bird" / "truncated.png")])


def test_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        folder.load_image_folder(tmp_path / "missing", image_size=8, channels=3)
    with pytest.raises(ValueError, match="no class sub-folders"):
        folder.load_image_folder(tmp_path, image_size=8, channels=3)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="empty_class"):
        folder.load_image_folder(tmp_path, image_size=8, channels=3)
    with pytest.raises(ValueError, match="channels"):
        folder.load_image_folder(tmp_path, image_size=8, channels=2)


def test_all_files_unreadable_is_an_error_even_when_skipping(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="all 1 image files are unreadable"):
        folder.load_image_folder(tmp_path, image_size=8, channels=1, skip_corrupt=True)
