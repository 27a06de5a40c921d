"""Models: the diffusion UNet (`unet`, `layers`) and the downstream classifiers (`classifiers`),
with the one parameter counter that every part of jaxdpdm uses."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def count_params(tree: Any, mask: Any = None) -> int:
    """Number of scalar parameters in `tree`.

    Args:
      tree: a pytree of arrays or of `jax.ShapeDtypeStruct`s (from `jax.eval_shape`, so that a
        model is counted without allocating it).
      mask: None (count every leaf), or a pytree of bools with `tree`'s structure up to its
        leaves: only the leaves marked True are counted (e.g. `dp.trainable_mask`).
    """
    leaves = jax.tree.leaves(tree)
    flags = [True] * len(leaves) if mask is None else jax.tree.structure(tree).flatten_up_to(mask)
    return int(
        sum(int(np.prod(leaf.shape, dtype=np.int64)) for leaf, keep in zip(leaves, flags) if keep))
