"""Where the FID Inception weights come from (a local file, or pytorch-fid's release fetched
once) and how they are loaded (`load_inception_params`).

With `eval.download_inception_weights=True` (and no `eval.inception_weights`), the first FID
evaluation on a connected machine downloads pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
into the cache folder, checks its SHA-256 against the published digest (a mismatch keeps
nothing), converts it once into a torch-free `.npz` (this step needs torch, see
`convert_inception_weights`) and deletes the `.pth`; later evaluations read the `.npz`. Offline,
the download fails with one line saying where to get the file and how to point
`eval.inception_weights` at it.

Cache folder: `$JAXDPDM_CACHE_DIR`, else `$XDG_CACHE_HOME/jaxdpdm`, else `~/.cache/jaxdpdm`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
import zipfile

import numpy as np

from jaxdpdm.evaluation import convert_inception_weights, inception

log = logging.getLogger(__name__)

PTH_NAME = "pt_inception-2015-12-05-6726825d.pth"
PTH_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{PTH_NAME}"
# The published SHA-256 of that file (95,628,359 bytes); torch.hub's name carries its first
# 8 hex digits. Not re-measured here: this machine cannot reach the release.
PTH_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
NPZ_NAME = "fid_inception-2015-12-05-6726825d.npz"
_BLOCK = 1 << 20


def cache_dir() -> str:
    if os.environ.get("JAXDPDM_CACHE_DIR"):
        return os.path.expanduser(os.environ["JAXDPDM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return os.path.join(os.path.expanduser(base), "jaxdpdm")


def resolve(path: str | None, *, download: bool, cache: str | None = None) -> str:
    """The local weights file FID should load.

    Args:
      path: `eval.inception_weights`; when set it is used as given (`~` expanded).
      download: `eval.download_inception_weights`: without `path`, fetch, verify and convert
        pytorch-fid's weights into `cache` unless they are already there.
      cache: the cache folder (default `cache_dir()`).

    Raises:
      ValueError: neither is set, the download is not the expected file, or converting needs
        torch (the verified `.pth` stays in the cache for the next try).
      FileNotFoundError: the download failed (offline).
    """
    if path:
        return os.path.expanduser(path)
    if not download:
        raise ValueError("FID needs eval.inception_weights (a local file) or "
                         "eval.download_inception_weights=True")
    cache = cache or cache_dir()
    npz = os.path.join(cache, NPZ_NAME)
    if os.path.isfile(npz):
        return npz
    pth = os.path.join(cache, PTH_NAME)
    if not (os.path.isfile(pth) and convert_inception_weights.sha256(pth) == PTH_SHA256):
        fetch(PTH_URL, pth, PTH_SHA256)
    convert_inception_weights.convert(pth, npz)
    os.remove(pth)
    return npz


def load_inception_params(path: str | os.PathLike) -> dict:
    """Loads FID Inception weights from a local `.npz` (converted) or `.pth` (needs torch).

    Returns:
      Flax variables `{"params": ..., "batch_stats": ...}` for `inception.make_feature_fn`.
    Raises:
      FileNotFoundError if `path` does not exist; ValueError for an unreadable, truncated or
      wrong file (naming the first offending parameter).
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Inception weights file {path!r} not found. Download "
            "pt_inception-2015-12-05-6726825d.pth from https://github.com/mseitzer/pytorch-fid/"
            "releases, or unset eval.inception_weights and set "
            "eval.download_inception_weights=True to fetch it on a machine with internet.")
    if path.endswith((".pth", ".pt")):
        flat = convert_inception_weights.load_torch_state_dict(path)  # imports torch
    else:
        try:
            with np.load(path, allow_pickle=False) as data:
                flat = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"cannot read Inception weights {path!r} as .npz ({e}); "
                             "truncated download or wrong format?") from e
    return inception.variables_from_flat(flat)


def fetch(url: str, dest: str, sha256: str, *, timeout: float = 60.0) -> None:
    """Downloads `url` to `dest` if its SHA-256 is `sha256`; otherwise keeps nothing.

    Raises:
      FileNotFoundError: the URL cannot be read (no network, moved file).
      ValueError: the content's SHA-256 differs.
    """
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    partial = dest + ".part"
    digest = hashlib.sha256()
    log.info("downloading %s to %s", url, dest)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as f:
            for block in iter(lambda: response.read(_BLOCK), b""):
                digest.update(block)
                f.write(block)
    except (urllib.error.URLError, OSError) as e:
        if os.path.exists(partial):
            os.remove(partial)
        reason = getattr(e, "reason", None) or e
        raise FileNotFoundError(
            f"could not download the FID Inception weights from {url} ({reason}). On a machine "
            f"with internet, download {PTH_NAME} from https://github.com/mseitzer/pytorch-fid/"
            "releases (tag fid_weights) and set eval.inception_weights to the file") from e
    if digest.hexdigest() != sha256:
        os.remove(partial)
        raise ValueError(f"the file downloaded from {url} has SHA-256 {digest.hexdigest()}, not "
                         f"the published {sha256}: not the FID Inception weights (nothing kept)")
    os.replace(partial, dest)
