"""Flax tests compare with the float64 NumPy reference, so x64 is on for the whole directory.

Every array these tests build has an explicit dtype, so float32 cases stay float32.
"""

import jax

jax.config.update("jax_enable_x64", True)
