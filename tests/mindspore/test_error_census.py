"""The census of bad inputs (docs/errors.md) in the MindSpore environment: every row that applies to mindspore
raises exactly its documented class and message and leaves its input unchanged."""

import pytest

from xnorm.conformance import error_census

ROWS = error_census.rows_for("mindspore")


@pytest.mark.parametrize("row", ROWS, ids=[f"{row.id}-mindspore" for row in ROWS])
def test_documented_error_and_nothing_changed(row, tmp_path):
    error_census.check(row, "mindspore", tmp_path)
