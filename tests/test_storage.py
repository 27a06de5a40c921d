"""Workdir file helpers: path handling for local and `gs://` paths, atomic writes, writable dirs."""

import os

import pytest

from jaxdpdm import storage


@pytest.mark.parametrize(
    "url", ["gs://bucket/run", "gs://bucket/run/", "s3://b/x/y.json", "gs://bucket/a/../b"])
def test_normalize_keeps_remote_urls_unchanged(url):
    assert storage.is_remote(url)
    assert storage.normalize(url) == url


@pytest.mark.parametrize("relative", ["run", "a/b/../c", "./x"])
def test_normalize_makes_local_paths_absolute(tmp_path, monkeypatch, relative):
    monkeypatch.chdir(tmp_path)
    normalized = storage.normalize(relative)
    assert not storage.is_remote(relative)
    assert os.path.isabs(normalized)
    assert normalized == os.path.normpath(os.path.join(str(tmp_path), relative))


def test_normalize_accepts_path_objects(tmp_path):
    assert storage.normalize(tmp_path / "x") == str(tmp_path / "x")


@pytest.mark.parametrize("base, parts, expected", [
    ("gs://bucket/run", ("checkpoints", "3"), "gs://bucket/run/checkpoints/3"),
    ("gs://bucket/run/", ("report.json",), "gs://bucket/run/report.json"),
    ("/tmp/run", ("eval", "summary.txt"), "/tmp/run/eval/summary.txt"),
    ("run", ("a",), os.path.join("run", "a")),
])
def test_join(base, parts, expected):
    assert storage.join(base, *parts) == expected


def _leftovers(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


def test_write_bytes_creates_parents_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "deep" / "er" / "blob.bin"
    storage.write_bytes(str(path), b"\x00\x01\xff")
    assert path.read_bytes() == b"\x00\x01\xff"
    assert os.listdir(path.parent) == ["blob.bin"]


def test_write_text_overwrites_atomically(tmp_path):
    path = str(tmp_path / "report.txt")
    storage.write_text(path, "first version, rather long\n")
    storage.write_text(path, "second\n")
    assert storage.read_text(path) == "second\n"
    assert os.listdir(tmp_path) == ["report.txt"]


def test_write_text_is_utf8(tmp_path):
    path = tmp_path / "eps.txt"
    storage.write_text(str(path), "epsilon \u03b5 <= 10, \u03b4 = 1e-5")
    assert path.read_bytes().decode("utf-8") == "epsilon \u03b5 <= 10, \u03b4 = 1e-5"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = str(tmp_path / "report.json")
    storage.write_text(path, "old")
    with pytest.raises(TypeError):
        storage.write_bytes(path, "not bytes")  # fails inside the write
    assert storage.read_text(path) == "old"
    assert _leftovers(tmp_path) == []


def test_written_files_are_readable_like_ordinary_files(tmp_path):
    """The temporary file must not leak its private 0600 mode into reports others should read."""
    path = tmp_path / "report.txt"
    storage.write_text(str(path), "x")
    reference = tmp_path / "reference.txt"
    reference.write_text("x")  # open(): 0666 & ~umask
    assert (path.stat().st_mode & 0o777) == (reference.stat().st_mode & 0o777)


def test_ensure_writable_dir_creates_nested_folders(tmp_path):
    path = tmp_path / "a" / "b" / "workdir"
    result = storage.ensure_writable_dir(str(path))
    assert result == str(path)
    assert path.is_dir()
    assert os.listdir(path) == []  # the write probe is removed


def test_ensure_writable_dir_accepts_an_existing_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("data")
    assert storage.ensure_writable_dir(str(tmp_path)) == str(tmp_path)
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_ensure_writable_dir_returns_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.ensure_writable_dir("rel") == str(tmp_path / "rel")


@pytest.mark.parametrize("below", ["", "sub"])
def test_ensure_writable_dir_under_a_regular_file_raises_value_error(tmp_path, below):
    regular = tmp_path / "file.txt"
    regular.write_text("I am a file")
    target = os.path.join(regular, below) if below else str(regular)
    with pytest.raises(ValueError, match="not writable"):
        storage.ensure_writable_dir(target)
    assert regular.read_text() == "I am a file"


def test_isdir_exists_listdir(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("")
    assert storage.isdir(str(tmp_path / "d")) and not storage.isdir(str(tmp_path / "f"))
    assert storage.exists(str(tmp_path / "f")) and not storage.exists(str(tmp_path / "nope"))
    assert sorted(storage.listdir(str(tmp_path))) == ["d", "f"]
