"""pytest options for the conformance suite: ``pytest conformance --backend torch [--device gpu]``.

``--backend`` takes a backend (``torch``, ``mindspore``, ``flax``), an adapter (``mindspore-graph``)
or a third-party adapter as ``package.module:Class``; repeat it for several. Without it, every
backend installed in this environment runs. Results are saved under ``--results-dir`` at the end.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from xnorm.conformance.adapters import adapter_names, installed_adapters, load_adapter
from xnorm.conformance.cases import catalogue
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
        adapter = _suite(metafunc.config, name).adapter
        for case in catalogue(adapter.dtypes, devices):
            params.append(pytest.param(name, case, id=f"{name}::{case.id}"))
    metafunc.parametrize(("adapter_name", "conformance_case"), params)


@pytest.fixture
def conformance_suite(request, adapter_name):
    return _suite(request.config, adapter_name)


def pytest_sessionfinish(session, exitstatus):
    results_dir = Path(session.config.getoption("--results-dir"))
    for suite in session.config._xnorm_suites.values():
        if suite.results:
            folder = suite.save(results_dir)
            session.config._xnorm_saved = getattr(session.config, "_xnorm_saved", []) + [str(folder)]


def pytest_terminal_summary(terminalreporter, config):
    for folder in getattr(config, "_xnorm_saved", []):
        terminalreporter.write_line(
            f"xnorm conformance results saved in {folder} (report.md, summary.json, arrays.npz)"
        )
