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
    opaque_rgba = np.full((4, 4, 4), 200, np.uint8)
    opaque_rgba[..., 3] = 255  # an alpha channel with no transparent pixel is dropped
    save(root / "cat" / "y.png", opaque_rgba, "RGBA")
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
        [str(collection / "dog" / "c.png"),
         str(collection / "bird" / "truncated.png")])


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


# --- pixel formats (PIL modes) -------------------------------------------------------------------


def _read(path, channels=1):
    return folder.read_image(path, image_size=4, channels=channels)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    """A 16-bit PNG (PIL mode I;16) used to become all-white: PIL clips levels > 255."""
    levels = np.array([[0, 257, 32768, 65535]] * 4, np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(levels).save(path)
    assert Image.open(path).mode == "I;16"
    np.testing.assert_array_equal(_read(path)[..., 0], [[0, 1, 128, 255]] * 4)
    np.testing.assert_array_equal(_read(path, channels=3)[0, :, 0], [0, 1, 128, 255])


@pytest.mark.parametrize("mode", ["LA", "PA", "P", "RGBA"])
def test_opaque_alpha_and_palettes_convert(tmp_path, mode):
    rgba = Image.new("RGBA", (4, 4), (60, 60, 60, 255))
    image = rgba.convert(mode) if mode != "PA" else rgba.convert("P").convert("PA")
    assert image.mode == mode
    path = tmp_path / "x.png"
    (image if mode != "PA" else image.convert("RGBA")).save(path)  # PNG cannot store PA
    if mode == "PA":  # read a PA image directly: what a palette PNG with alpha decodes to
        assert folder.to_8bit(image).mode == "RGB"
    np.testing.assert_array_equal(_read(path), np.full((4, 4, 1), 60))


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("RGBA", (4, 4), (9, 9, 9, 0)),
        lambda: Image.new("LA", (4, 4), (9, 128)),
        lambda: Image.new("RGBA", (4, 4), (9, 9, 9, 0)).convert("P"),  # palette + tRNS
    ])
def test_transparent_pixels_are_refused_with_the_reason(tmp_path, make):
    path = tmp_path / "ghost.png"
    make().save(path)
    with pytest.raises(ValueError, match="transparent") as error:
        _read(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("mode, message", [("F", "floating-point"), ("I", "32-bit integer")])
def test_float_and_32_bit_images_are_refused(tmp_path, mode, message):
    path = tmp_path / "odd.png"  # a TIFF under a .png name: PIL goes by the content
    Image.new(mode, (4, 4), 7).save(path, format="TIFF")
    with pytest.raises(ValueError, match=message):
        _read(path)
