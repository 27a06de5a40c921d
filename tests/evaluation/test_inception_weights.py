"""Fetching the FID Inception weights: verified by SHA-256, cached, converted once; no network.

The "release" is a local file reached through a file:// URL, so every path of the download code
runs here, offline.
"""

import hashlib
import pathlib

import numpy as np
import pytest

from jaxdpdm.evaluation import inception, inception_weights


def _serve(monkeypatch, path: pathlib.Path, digest: str | None = None) -> None:
    """Points the module's release URL at `path`, expecting `digest` (default: the file's)."""
    monkeypatch.setattr(inception_weights, "PTH_URL", path.as_uri())
    monkeypatch.setattr(inception_weights, "PTH_SHA256", digest or
                        hashlib.sha256(path.read_bytes()).hexdigest())


def test_fetch_keeps_the_file_only_when_its_digest_matches(tmp_path):
    release = tmp_path / "release.bin"
    release.write_bytes(np.random.default_rng(0).bytes(3 << 20))  # several read blocks
    good = hashlib.sha256(release.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "w.pth"
    inception_weights.fetch(release.as_uri(), str(dest), good)
    assert dest.read_bytes() == release.read_bytes()

    other = tmp_path / "cache" / "other.pth"
    with pytest.raises(ValueError, match=f"SHA-256 {good}, not the published 0+"):
        inception_weights.fetch(release.as_uri(), str(other), "0" * 64)
    assert sorted(p.name for p in other.parent.iterdir()) == ["w.pth"]  # nothing else kept


def test_offline_gives_the_manual_instructions(tmp_path):
    with pytest.raises(FileNotFoundError, match="could not download.*set eval.inception_weights"):
        inception_weights.fetch((tmp_path / "nowhere.pth").as_uri(), str(tmp_path / "w.pth"),
                                "0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_resolve_prefers_the_configured_file_and_needs_one_of_the_two(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert inception_weights.resolve("~/w.npz", download=True) == str(tmp_path / "w.npz")
    with pytest.raises(ValueError, match="download_inception_weights=True"):
        inception_weights.resolve(None, download=False)


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXDPDM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert inception_weights.cache_dir() == str(tmp_path / "xdg" / "jaxdpdm")
    monkeypatch.setenv("JAXDPDM_CACHE_DIR", str(tmp_path / "mine"))
    assert inception_weights.cache_dir() == str(tmp_path / "mine")


def test_first_use_downloads_verifies_and_converts_once(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    shapes = {**inception.reference_param_shapes(), **inception.FID_FC_SHAPES}
    flat = {name: rng.normal(0.0, 0.1, shape).astype(np.float32) for name, shape in shapes.items()}
    release = tmp_path / "release.pth"
    torch.save({k: torch.from_numpy(v) for k, v in flat.items()}, release)
    _serve(monkeypatch, release)
    cache = tmp_path / "cache"

    npz = inception_weights.resolve(None, download=True, cache=str(cache))
    assert npz == str(cache / inception_weights.NPZ_NAME)
    assert sorted(p.name for p in cache.iterdir()) == [inception_weights.NPZ_NAME]  # .pth gone
    loaded = inception.flat_from_variables(inception_weights.load_inception_params(npz))
    for name, value in loaded.items():
        np.testing.assert_array_equal(value, flat[name])

    # Later uses read the cache: no download, no conversion.
    def no_network(*args, **kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(inception_weights, "fetch", no_network)
    assert inception_weights.resolve(None, download=True, cache=str(cache)) == npz


def test_a_verified_download_survives_a_missing_torch(tmp_path, monkeypatch):
    release = tmp_path / "release.pth"
    release.write_bytes(b"stands in for the weights")
    _serve(monkeypatch, release)
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="needs torch"):
        inception_weights.resolve(None, download=True, cache=str(cache))
    kept = cache / inception_weights.PTH_NAME
    assert kept.read_bytes() == release.read_bytes()  # the next try (with torch) converts it
    monkeypatch.setattr(inception_weights, "PTH_URL", (tmp_path / "gone").as_uri())
    with pytest.raises(ValueError, match="needs torch"):  # not "could not download"
        inception_weights.resolve(None, download=True, cache=str(cache))
