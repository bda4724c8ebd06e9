"""The census of bad inputs (docs/errors.md) in the torch environment: every row that applies to torch
raises exactly its documented class and message and leaves its input unchanged."""

import pytest

from xnorm.conformance import error_census

ROWS = error_census.rows_for("torch")


@pytest.mark.parametrize("row", ROWS, ids=[f"{row.id}-torch" for row in ROWS])
def test_documented_error_and_nothing_changed(row, tmp_path):
    error_census.check(row, "torch", tmp_path)
