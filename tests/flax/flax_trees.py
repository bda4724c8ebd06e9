"""Snapshots of variable trees for the Flax tests: an error must leave the layer and its variables as they were."""

import jax
import numpy as np


def snapshot(tree):
    """A copy of every leaf of ``tree`` (linen variables, an NNX pure dict) as NumPy arrays."""
    return jax.tree.map(lambda a: np.array(a, copy=True), tree)


def assert_same(tree, saved):
    """``tree`` has the structure and the exact values :func:`snapshot` saved."""
    leaves, structure = jax.tree.flatten(tree)
    saved_leaves, saved_structure = jax.tree.flatten(saved)
    assert structure == saved_structure
    for a, b in zip(leaves, saved_leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
