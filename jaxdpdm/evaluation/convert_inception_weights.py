"""Converts pytorch-fid's FID Inception weights (`.pth`) into a torch-free `.npz`.

Usage (torch needed for this step only):

    python -m jaxdpdm.evaluation.convert_inception_weights \
        pt_inception-2015-12-05-6726825d.pth OUT.npz

The `.pth` is pytorch-fid's release asset (https://github.com/mseitzer/pytorch-fid/releases,
tag `fid_weights`); download it on a machine with internet. The `.npz` keeps the state-dict
names and torch layouts, is validated against `inception.reference_param_shapes()` before it is
written (atomically), and is what `inception_weights.load_inception_params` reads without
torch.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Mapping

import numpy as np

from jaxdpdm.evaluation import inception

logger = logging.getLogger(__name__)


def state_dict_to_numpy(state_dict: Mapping) -> dict[str, np.ndarray]:
    """torch state dict (name -> tensor) -> name -> float32 numpy array, torch layouts kept.

    `num_batches_tracked` counters (training bookkeeping) are dropped.
    """
    flat = {}
    for name, value in state_dict.items():
        if name.endswith(".num_batches_tracked"):
            continue
        if hasattr(value, "detach"):
            value = value.detach().cpu().float().numpy()
        flat[name] = np.asarray(value, dtype=np.float32)
    return flat


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a `.pth` state dict with torch (tensors only, no pickled code) into numpy arrays."""
    path = os.fspath(path)
    try:
        import torch
    except ImportError as e:
        # A ValueError, like every other unusable weights file: the command line prints one line.
        raise ValueError(
            f"reading {path!r} (a .pth) needs torch, which is not installed: `pip install torch`, "
            "or convert the file once on a machine with torch "
            "(`python -m jaxdpdm.evaluation.convert_inception_weights IN.pth OUT.npz`) and "
            "point eval.inception_weights at the .npz") from e
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/corrupt archives
        raise ValueError(f"cannot read {path!r} as a torch state dict ({type(e).__name__}: {e}); "
                         "truncated download or wrong file?") from e
    if isinstance(state_dict, Mapping) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(state_dict).__name__})")
    return state_dict_to_numpy(state_dict)


def sha256(path: str) -> str:
    """The hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_flat_npz(flat: Mapping[str, np.ndarray], out_path: str | os.PathLike) -> str:
    """Validates `flat` as FID Inception weights and writes it as `.npz` atomically."""
    inception.variables_from_flat(flat)  # raises ValueError naming the first bad parameter
    keep = {
        k: np.asarray(v, np.float32)
        for k, v in flat.items()
        if k in inception.reference_param_shapes() or k in inception.FID_FC_SHAPES
    }
    out_path = os.fspath(out_path)
    directory = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **keep)
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return out_path


def convert(in_path: str | os.PathLike, out_path: str | os.PathLike) -> str:
    """Converts a pytorch-fid `.pth` into a validated `.npz`; returns the input's SHA-256.

    torch.hub file names end in the first hex digits of the file's SHA-256
    (`...-6726825d.pth`); when the name carries such a suffix and the content disagrees, the
    file is corrupt or renamed, which is logged as a warning.
    """
    in_path = os.fspath(in_path)
    digest = sha256(in_path)
    match = re.search(r"-([0-9a-f]{8,})\.pth?$", os.path.basename(in_path))
    if match and not digest.startswith(match.group(1)):
        logger.warning("%s: SHA-256 %s does not start with %s as its name says; corrupt file?",
                       in_path, digest, match.group(1))
    save_flat_npz(load_torch_state_dict(in_path), out_path)
    logger.info("converted %s (sha256 %s) -> %s", in_path, digest, out_path)
    return digest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("in_path", help="pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("out_path", help="destination .npz")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        digest = convert(args.in_path, args.out_path)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out_path} (input sha256 {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
