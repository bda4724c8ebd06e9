"""docs/errors.md is the census of bad inputs (conformance/error_census.py) rendered, and the census is
whole: every row has an input or a reason in every backend, and every error class a call can raise on its
input is in it."""

from pathlib import Path

import pytest

import xnorm
from xnorm import errors
from xnorm.conformance import error_census

DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"

# Raised by what is installed, not by the input: tests/torch/test_torch_errors.py checks it.
NOT_AN_INPUT = {"BackendNotInstalledError"}


def test_docs_errors_md_is_the_rendered_census():
    assert DOC.read_text(encoding="utf-8") == error_census.render_markdown(), (
        "docs/errors.md differs from the census; regenerate it: "
        "python -m xnorm.conformance.error_census --write docs/errors.md"
    )


def test_every_error_class_has_a_row():
    documented = {name for name in errors.__all__ if name != "XnormError"} - NOT_AN_INPUT
    assert documented - {row.error for row in error_census.ROWS} == set()


@pytest.mark.parametrize("row", error_census.ROWS, ids=[row.id for row in error_census.ROWS])
def test_each_row_names_an_xnorm_error_and_covers_every_backend(row):
    assert issubclass(getattr(xnorm, row.error), xnorm.XnormError)
    for backend in error_census.BACKENDS:
        applies, reason = backend in row.subjects, row.not_applicable.get(backend)
        assert applies != bool(reason), f"{row.id}: {backend} needs an input or a reason, not both"
    assert set(row.differences) <= set(row.subjects)


def test_row_ids_are_unique():
    ids = [row.id for row in error_census.ROWS]
    assert len(ids) == len(set(ids))
