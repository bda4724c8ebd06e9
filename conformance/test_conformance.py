"""One test per catalogue case and adapter; see conftest.py for the options and runner.py for the checks."""

import pytest


def test_case(conformance_suite, conformance_case):
    result = conformance_suite.run(conformance_case)
    if result.status == "not-run":
        pytest.skip(f"not run: {result.reason}")
    if result.status == "xfail":
        pytest.xfail(result.reason)
    assert result.status == "passed", f"{result.case.id} {result.status}:\n" + "\n".join(
        result.failures() or [result.reason]
    )
