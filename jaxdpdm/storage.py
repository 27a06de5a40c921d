"""Workdir file operations that work on local disks and on cloud buckets (`gs://...`).

TPU pod runs keep their workdir in a GCS bucket, which every host can reach and which survives
preemption; orbax and TensorBoard write there natively. The few files jaxdpdm writes itself
(reports, sample grids) go through these helpers. Local writes are atomic (temporary file, then
rename); an object-store upload is atomic by nature.
"""

from __future__ import annotations

import os
import tempfile

from etils import epath


def is_remote(path: str) -> bool:
    return "://" in str(path)


def normalize(path: str) -> str:
    """An absolute local path, or the remote URL unchanged (`abspath` would mangle `gs://`)."""
    return str(path) if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
    return str(epath.Path(path).joinpath(*parts)) if is_remote(path) else os.path.join(path, *parts)


def isdir(path: str) -> bool:
    return epath.Path(path).is_dir()


def listdir(path: str) -> list[str]:
    return [p.name for p in epath.Path(path).iterdir()]


def exists(path: str) -> bool:
    return epath.Path(path).exists()


def rename(source: str, target: str) -> None:
    """Renames a file or folder (on an object store: a copy then a delete, not atomic)."""
    epath.Path(source).rename(target)


def ensure_writable_dir(path: str) -> str:
    """Creates `path` if needed and proves it writable; returns its normalized form.

    Raises:
      ValueError: the folder cannot be created or written.
    """
    path = normalize(path)
    try:
        epath.Path(path).mkdir(parents=True, exist_ok=True)
        # Named per process: two starts probing at once must not remove each other's probe.
        probe = epath.Path(join(path, f".write_test.{os.getpid()}"))
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"workdir {path} is not writable: {e}") from e
    return path


def _new_file_mode() -> int:
    """The mode `open()` gives a new file: 0o666 less the umask (read once, at import, since
    reading the umask means setting it, which is not thread-safe)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


# mkstemp creates its file with mode 0o600; a renamed report should read like any other file.
_NEW_FILE_MODE = _new_file_mode()


def write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` so that no reader ever sees a partial file."""
    if is_remote(path):
        epath.Path(path).write_bytes(data)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _NEW_FILE_MODE)
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def read_text(path: str) -> str:
    return epath.Path(path).read_text()
