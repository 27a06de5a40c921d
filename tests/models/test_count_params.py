"""Tests for jaxdpdm/models/__init__.py: the one parameter counter."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxdpdm.models import count_params


def test_counts_arrays_and_shapes_alike():
    tree = {"a": np.zeros((3, 4)), "b": {"c": np.zeros((5,)), "d": np.zeros(())}}
    assert count_params(tree) == 18
    shapes = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, tree))
    assert count_params(shapes) == 18
    assert count_params({}) == 0


def test_mask_counts_only_marked_leaves():
    tree = {"a": np.zeros((3, 4)), "b": {"c": np.zeros((5,)), "d": np.zeros((2, 2))}}
    assert count_params(tree, {"a": False, "b": {"c": True, "d": True}}) == 9
    assert count_params(tree, {"a": True, "b": {"c": False, "d": False}}) == 12
