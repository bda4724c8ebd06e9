"""The census of bad inputs (docs/errors.md) in the Flax environment, linen and NNX: every row that applies
raises exactly its documented class and message and leaves its input unchanged."""

import pytest

from xnorm.conformance import error_census

CASES = [(row, backend) for backend in ("flax-linen", "flax-nnx") for row in error_census.rows_for(backend)]


@pytest.mark.parametrize("row, backend", CASES, ids=[f"{row.id}-{backend}" for row, backend in CASES])
def test_documented_error_and_nothing_changed(row, backend, tmp_path):
    error_census.check(row, backend, tmp_path)
