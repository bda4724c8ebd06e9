"""pytest options for the conformance suite: ``pytest conformance --backend torch [--device gpu]``.

``--backend`` takes a backend (``torch``, ``mindspore``, ``flax``), an adapter (``mindspore-graph``)
or a third-party adapter as ``package.module:Class``; repeat it for several. Without it, every
backend installed in this environment runs. Results are saved under ``--results-dir`` at the end.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from xnorm.conformance.adapters import adapter_names, installed_adapters, load_adapter
from xnorm.conformance.cases import CATALOGUE_DTYPES, catalogue
from xnorm.conformance.runner import SuiteRun


def pytest_addoption(parser):
    group = parser.getgroup("xnorm conformance")
    group.addoption(
        "--backend",
        action="append",
        default=None,
        help="backend, adapter or module:Class to run (repeatable; default: every installed backend)",
    )
    group.addoption(
        "--device",
        action="append",
        default=None,
        help="cpu, gpu or ascend (repeatable; default: cpu). Absent devices are reported as not run.",
    )
    group.addoption("--results-dir", default="conformance-results", help="where each adapter's results are saved")
    group.addoption(
        "--best-effort",
        action="store_true",
        help="exit 0 although a requested device is absent (its cases are still reported not run)",
    )


def _selected(config):
    selectors = config.getoption("--backend") or installed_adapters()
    names = [name for selector in selectors for name in adapter_names(selector)]
    return names, config.getoption("--device") or ["cpu"]


def pytest_configure(config):
    config._xnorm_suites = {}


def _suite(config, name: str) -> SuiteRun:
    suites = config._xnorm_suites
    if name not in suites:
        suites[name] = SuiteRun(load_adapter(name))
    return suites[name]


def pytest_generate_tests(metafunc):
    if "conformance_case" not in metafunc.fixturenames:
        return
    names, devices = _selected(metafunc.config)
    params = []
    for name in names:
        _suite(metafunc.config, name)  # load it now: an unknown or uninstalled backend fails at collection
        for case in catalogue(CATALOGUE_DTYPES, devices):
            params.append(pytest.param(name, case, id=f"{name}::{case.id}"))
    metafunc.parametrize(("adapter_name", "conformance_case"), params)


@pytest.fixture
def conformance_suite(request, adapter_name):
    return _suite(request.config, adapter_name)


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    results_dir = Path(config.getoption("--results-dir"))
    config._xnorm_saved, config._xnorm_incomplete = [], []
    for suite in config._xnorm_suites.values():
        if not suite.results:
            continue
        config._xnorm_saved.append(str(suite.save(results_dir)))
        absent = suite.absent_devices()
        if absent and not config.getoption("--best-effort"):
            config._xnorm_incomplete.append(f"{suite.adapter.name}: device(s) {', '.join(absent)} absent")
    # Every case skipped because its device is absent would otherwise end as a green run.
    if config._xnorm_incomplete and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config):
    for folder in getattr(config, "_xnorm_saved", []):
        terminalreporter.write_line(
            f"xnorm conformance results saved in {folder} (report.md, summary.json, arrays.npz)"
        )
    for line in getattr(config, "_xnorm_incomplete", []):
        terminalreporter.write_line(
            f"xnorm conformance incomplete: {line}; nothing was checked there (exit status 1; "
            "--best-effort to accept)",
            red=True,
        )
