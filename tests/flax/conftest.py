"""Flax tests compare with the float64 NumPy reference, so x64 is on for the whole directory.

Every array these tests build has an explicit dtype, so float32 cases stay float32.
"""

import sys
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

# the tests import their shared helpers (flax_trees.py) from this folder; pytest's importlib mode does not
# put it on the path
sys.path.insert(0, str(Path(__file__).resolve().parent))
