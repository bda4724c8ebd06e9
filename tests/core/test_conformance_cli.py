"""`xnorm conformance` and `xnorm report` as a user runs them: exit codes that agree with what ran,
progress on the terminal, framework output in a log, and the report's verdict, HTML and picture.

The backends are the reference adapter and subclasses of it (written to a module in tmp_path, named on
the command line as ``module:Class`` like any third-party adapter), so no framework is needed.
"""

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from xnorm.cli import EXIT_INCOMPLETE, PARTS_PER_PROCESS, main
from xnorm.conformance import adapters as adapter_registry
from xnorm.conformance.cases import CATALOGUE_DTYPES, catalogue
from xnorm.conformance.fine_tuning import FINE_TUNING_CHECKS
from xnorm.conformance.oracles import oracle_for

REFERENCE = "xnorm.conformance.adapters.reference:ReferenceAdapter"

ADAPTERS = textwrap.dedent(
    '''
    import os
    import sys

    from xnorm.conformance.adapters.reference import ReferenceAdapter


    class Noisy(ReferenceAdapter):
        """Writes what frameworks write: native stderr lines, Python-level log lines, prints."""

        name = "numpy-noisy"

        def forward(self, handle, x, *, training=True):
            os.write(2, b"[ERROR] ANALYZER(1,ffff,python):native noise from a kernel\\n")
            sys.stderr.write("[WARNING] ME: the graph was compiled again\\n")
            print("a framework's print")
            return super().forward(handle, x, training=training)


    class CrashesAtBuild(ReferenceAdapter):
        """No layer can be built (MindSpore's float64 convolutions, Flax's grouped ConvTranspose)."""

        name = "numpy-crashes-at-build"

        def build(self, layer, weight, bias, dtype):
            raise TypeError("no float64 kernel")


    class Broken(ReferenceAdapter):
        """Drops the bias gradient's sign: gradient and training fail."""

        name = "numpy-broken"

        def gradients(self, handle, x, grad_output):
            grads = super().gradients(handle, x, grad_output)
            if "bias" in grads:
                grads["bias"] = -grads["bias"]
            return grads
    '''
)


@pytest.fixture
def adapters(tmp_path, monkeypatch):
    (tmp_path / "my_adapters.py").write_text(ADAPTERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_adapters"


def _summary(results, name):
    return json.loads((results / name / "summary.json").read_text())


def test_an_absent_device_runs_nothing_and_exits_non_zero_unless_best_effort(tmp_path, capfd):
    results = tmp_path / "results"
    assert main(["conformance", "--backend", REFERENCE, "--device", "gpu", "--results-dir", str(results)]) == (
        EXIT_INCOMPLETE
    )
    err = capfd.readouterr().err
    assert "incomplete" in err and "gpu" in err and "--best-effort" in err
    summary = _summary(results, "numpy-reference")
    total = len(catalogue(CATALOGUE_DTYPES, ["gpu"]))
    assert summary["counts"] == {"passed": 0, "failed": 0, "xfail": 0, "not-run": total}
    assert summary["absent_devices"] == ["gpu"]
    assert all(c["state"] == "not-run" for case in summary["cases"] for c in case["checks"].values())
    # the combined report says the same
    assert main(["report", "--results-dir", str(results)]) == EXIT_INCOMPLETE
    out = capfd.readouterr().out
    assert "**Verdict: INCOMPLETE**" in out and "device(s) gpu absent" in out

    assert main(["conformance", "--backend", REFERENCE, "--device", "cpu", "--device", "gpu", "--best-effort",
                 "--results-dir", str(results)]) == 0
    summary = _summary(results, "numpy-reference")
    assert summary["counts"]["passed"] == len(catalogue(("float64",), ["cpu"]))
    assert main(["report", "--best-effort", "--results-dir", str(results)]) == 0


def test_progress_on_the_terminal_and_framework_output_in_the_log(tmp_path, adapters, capfd):
    results = tmp_path / "results"
    argv = ["conformance", "--backend", f"{adapters}:Noisy", "--results-dir", str(results), "--jobs", "1"]
    assert main(argv) == 0  # in this process (in parts: test_an_adapter_run_in_parts_saves_what_one_process_saves)
    captured = capfd.readouterr()
    total = len(catalogue(CATALOGUE_DTYPES))
    assert f"numpy-noisy: {total}/{total} cases, 0 failed" in captured.err
    log = results / "numpy-noisy" / "run.log"
    assert str(log) in captured.err  # the terminal says where the noise went
    for noise in ("ANALYZER", "compiled again", "a framework's print"):
        assert noise not in captured.err and noise not in captured.out
        assert noise in log.read_text()
    n = len(catalogue(("float64",)))
    assert f"numpy-noisy: {n} passed, 0 failed, 0 expected, {total - n} not run" in captured.out
    assert _summary(results, "numpy-noisy")["log"] == "numpy-noisy/run.log"


def test_cases_failing_at_their_first_check_exit_1_with_every_later_check_not_run(tmp_path, adapters, capfd):
    results = tmp_path / "results"
    assert main(["conformance", "--backend", f"{adapters}:CrashesAtBuild", "--results-dir", str(results)]) == 1
    summary = _summary(results, "numpy-crashes-at-build")
    layer_kinds = ("weight_norm", "spectral_norm", "orthogonal")
    n = len(catalogue(("float64",), reparametrizations=layer_kinds))
    # the other dtypes' cases are not run (the orthogonal cases exist for float32 and float64 only); the
    # fine-tuning case builds no catalogue layer, so it passes
    fine_tuning = len(catalogue(("float64",), reparametrizations=("freeze",)))
    assert summary["counts"] == {
        "passed": fine_tuning, "failed": n, "xfail": 0, "not-run": len(catalogue(CATALOGUE_DTYPES)) - n - fine_tuning
    }
    every_case = catalogue(CATALOGUE_DTYPES, reparametrizations=layer_kinds)
    for check, counts in summary["check_counts"].items():
        if check in FINE_TUNING_CHECKS:
            assert counts["passed"] == fine_tuning and counts["failed"] == 0, check
            continue
        having = sum(check in oracle_for(case).checks for case in every_case)  # "preserves": weight norm only
        failed = n if check == "plain_forward" else 0
        assert counts == {"passed": 0, "failed": failed, "xfail": 0, "not-run": having - failed}, check
    assert main(["report", "--results-dir", str(results)]) == 1
    out = capfd.readouterr().out
    n_wn = len(catalogue(("float64",), reparametrizations=("weight_norm",)))
    assert "**Verdict: FAILED**: numpy-crashes-at-build:" in out and f"{n_wn} failed · {3 * n_wn} not run" in out


def test_a_failing_backend_exits_1_and_the_report_opens_with_the_verdict(tmp_path, adapters, capfd):
    results = tmp_path / "results"
    assert main(["conformance", "--backend", REFERENCE, "--results-dir", str(results)]) == 0
    assert main(["conformance", "--backend", f"{adapters}:Broken", "--results-dir", str(results)]) == 1
    err = capfd.readouterr().err
    assert "failed: linear-dim0-float64-cpu: gradient: dL/dbias out of tolerance" in err

    assert main(["report", "--results-dir", str(results)]) == 1
    out = capfd.readouterr().out
    report = (results / "report.md").read_text()
    first_screen = report.split("\n## ")[0]  # the verdict, before the first adapter's details
    assert "**Verdict: FAILED**: numpy-broken:" in first_screen
    weight_norm = catalogue(("float64",), reparametrizations=("weight_norm",))
    n_bias, n = sum(case.layer.bias for case in weight_norm), len(weight_norm)
    assert f"| `numpy-reference` | {n} passed · {3 * n} not run |" in first_screen
    assert f"| `numpy-broken` | {n - n_bias} passed · {n_bias} failed · {3 * n} not run |" in first_screen
    # the pair is compared on the cases both passed (those without a bias) and agrees there
    # every reparametrization's, and the fine-tuning case, which has no layer of the catalogue
    without_bias = sum(not case.layer.bias if hasattr(case, "layer") else 1 for case in catalogue(("float64",)))
    assert f"| `numpy-broken` vs `numpy-reference` | {without_bias} | yes |" in first_screen
    assert first_screen.rstrip() in out and "## numpy-broken" not in out  # the terminal gets the verdict
    assert f"(markdown: {results / 'report.md'})" in out and f"(html: {results / 'report.html'})" in out
    assert main(["report", "--full", "--results-dir", str(results)]) == 1
    assert report in capfd.readouterr().out

    html = (results / "report.html").read_text()
    assert "Verdict: FAILED" in html
    assert 'id="numpy-broken--linear-dim0-float64-cpu"' in html  # every case has an anchor
    assert "numpy-reference/arrays.npz" in html  # and a link to its saved arrays
    assert "dL/dbias out of tolerance" in html  # with its reason
    png = results / "report.png"
    if importlib.util.find_spec("matplotlib") is None:  # the torch session's environment has it (EXTRAS)
        assert '(picture: not made: matplotlib is not installed (pip install "xnorm[report]"))' in out
        assert not png.exists()
        return
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    assert imread(png).shape[0] > 200


def test_the_picture_is_reported_as_not_made_without_matplotlib(tmp_path, capfd, monkeypatch):
    import builtins

    results = tmp_path / "results"
    assert main(["conformance", "--backend", REFERENCE, "--results-dir", str(results)]) == 0
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    (results / "report.png").write_bytes(b"stale")
    assert main(["report", "--results-dir", str(results)]) == 0
    out = capfd.readouterr().out
    assert '(picture: not made: matplotlib is not installed (pip install "xnorm[report]"))' in out
    assert not (results / "report.png").exists()  # no stale picture beside a new report
    assert "<img" not in (results / "report.html").read_text()


def test_progress_estimates_the_time_left_from_the_cases_that_ran():
    import io

    from xnorm.conformance.console import Progress
    from xnorm.conformance.runner import run_suite

    now = [0.0]
    stream = io.StringIO()
    progress = Progress("numpy-reference", stream, every=10.0, clock=lambda: now[0])

    def ticking(result, done, total, runnable):
        now[0] += 1.0 if result.status != "not-run" else 0.0  # one second per case that runs
        progress(result, done, total, runnable)

    from xnorm.conformance.adapters.reference import ReferenceAdapter

    run_suite(ReferenceAdapter(), progress=ticking)
    lines = stream.getvalue().splitlines()
    n = len(catalogue(("float64",)))
    total = len(catalogue(CATALOGUE_DTYPES))
    # a line every 10 s of cases that run: the float32 cases do not run (no time), then 10 float64 ones ran,
    # n - 10 are left at one second each
    first = len(catalogue(("float32",))) + 10
    assert lines[0] == f"  numpy-reference: {first}/{total} cases, 0 failed, 0:10 elapsed, about {(n - 10) // 60}:" \
        f"{(n - 10) % 60:02d} left"
    assert lines[-1] == f"  numpy-reference: {total}/{total} cases, 0 failed, {n // 60}:{n % 60:02d} elapsed"
    assert np.all(np.diff([int(line.split("/")[0].split()[-1]) for line in lines]) > 0)


def test_adapters_run_side_by_side_in_their_own_processes(tmp_path, adapters, capfd):
    results = tmp_path / "results"
    names = [f"{adapters}:Broken", REFERENCE, f"{adapters}:Noisy"]
    argv = ["conformance", *(arg for name in names for arg in ("--backend", name)), "--results-dir", str(results)]
    assert main([*argv, "--jobs", "2"]) == 1  # one adapter failed: the whole run failed
    captured = capfd.readouterr()
    total = len(catalogue(CATALOGUE_DTYPES))
    parts = 2 * PARTS_PER_PROCESS
    for name in ("numpy-broken", "numpy-reference", "numpy-noisy"):
        # each child's progress reached the terminal: every adapter in parts, which ended with all of their
        # cases done and together ran the whole catalogue
        sizes = []
        for part in range(1, parts + 1):
            last = [line for line in captured.err.splitlines()
                    if line.startswith(f"  {name} (part {part} of {parts}): ")][-1]
            done, size = last.split(": ")[1].split(" cases")[0].split("/")
            assert done == size
            sizes.append(int(size))
        assert sum(sizes) == total and min(sizes) > 0
        assert (results / name / "summary.json").is_file()
        assert len(_summary(results, name)["cases"]) == total
    assert not (results / ".parts").exists()  # merged, then removed
    # the counts come in the adapters' order, whichever child ended first
    order = [captured.out.index(f"{name}: ") for name in ("numpy-broken", "numpy-reference", "numpy-noisy")]
    assert order == sorted(order)
    assert "ANALYZER" not in captured.err + captured.out
    assert _summary(results, "numpy-broken")["counts"]["failed"] > 0
    assert _summary(results, "numpy-reference")["counts"]["failed"] == 0
    assert main([*argv[:-4], "--results-dir", str(results), "--jobs", "0"]) == 2
    assert "--jobs 0: give at least 1" in capfd.readouterr().err


def _without_times(summary: dict) -> dict:
    cases = [{key: value for key, value in case.items() if key != "seconds"} for case in summary["cases"]]
    return {**{key: value for key, value in summary.items() if key not in ("finished", "cases")}, "cases": cases}


def test_an_adapter_run_in_parts_saves_what_one_process_saves(tmp_path, adapters, capfd):
    """Split into three parts (three processes) or run in this process, the broken adapter's results are
    the same: cases in catalogue order with their checks and reasons, counts, arrays, report and exit
    status; its log holds every part's framework output."""
    argv = ["conformance", "--backend", f"{adapters}:Broken", "--backend", f"{adapters}:Noisy"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main([*argv, "--results-dir", str(whole), "--jobs", "1"]) == 1
    assert main([*argv, "--results-dir", str(parts), "--jobs", "3"]) == 1
    capfd.readouterr()
    for name in ("numpy-broken", "numpy-noisy"):
        assert _without_times(_summary(parts, name)) == _without_times(_summary(whole, name))
        with np.load(whole / name / "arrays.npz") as one, np.load(parts / name / "arrays.npz") as merged:
            assert sorted(one.files) == sorted(merged.files) and one.files
            for key in one.files:
                np.testing.assert_array_equal(merged[key], one[key])
        assert (parts / name / "report.md").read_text() == (whole / name / "report.md").read_text()
    log = (parts / "numpy-noisy" / "run.log").read_text()
    count = 3 * PARTS_PER_PROCESS
    assert [log.count(f"==> part {part} of {count} <==") for part in range(1, count + 1)] == [1] * count
    assert log.count("native noise from a kernel") == (whole / "numpy-noisy" / "run.log").read_text().count(
        "native noise from a kernel") > 0


def test_parts_deal_every_case_once_keeping_a_layers_cases_together():
    from xnorm.conformance.shards import part_of

    cases = catalogue(CATALOGUE_DTYPES)
    for parts in (1, 2, 3, 5):
        dealt = [part_of(cases, part, parts) for part in range(parts)]
        ids = [case.id for part in dealt for case in part]
        assert sorted(ids) == sorted(case.id for case in cases) and len(set(ids)) == len(ids)
        position = {case.id: index for index, case in enumerate(cases)}
        for part in dealt:
            assert [position[case.id] for case in part] == sorted(position[case.id] for case in part)
            # every dtype in every part, and no part much larger than another
            assert {case.dtype for case in part} == set(CATALOGUE_DTYPES)
            assert len(part) <= len(cases) / parts * 1.1
        owner = {case.id: index for index, part in enumerate(dealt) for case in part}
        for case, following in zip(cases, cases[1:], strict=False):
            if getattr(case, "layer", None) is not None and (case.layer, case.dtype, case.reparametrization) == (
                    getattr(following, "layer", None), following.dtype, following.reparametrization):
                assert owner[case.id] == owner[following.id], (case.id, following.id)
    with pytest.raises(ValueError):
        part_of(cases, 2, 2)


def test_a_part_that_saves_nothing_fails_the_run_and_keeps_its_output(tmp_path, adapters, capfd, monkeypatch):
    """A child that dies (killed, out of memory) leaves no results: its adapter is failed, not merged from
    the parts that did save, an earlier run's results of it are removed (the report would take them for
    this run's), and the parts' folder stays for the output."""
    results = tmp_path / "results"
    (tmp_path / "dies.py").write_text(textwrap.dedent(
        """
        import os
        import zlib

        from xnorm.conformance.adapters.reference import ReferenceAdapter
        from xnorm.conformance.cases import catalogue
        from xnorm.conformance.runner import CATALOGUE_DTYPES
        from xnorm.conformance.shards import part_of
        from xnorm.cli import PARTS_PER_PROCESS

        # the runner seeds each case with the CRC-32 of its id; --jobs 2 deals an adapter out in parts
        PARTS = 2 * PARTS_PER_PROCESS
        PART_TWO = {zlib.crc32(case.id.encode()) for case in part_of(catalogue(CATALOGUE_DTYPES), 1, PARTS)}


        class DiesInPartTwo(ReferenceAdapter):
            name = "numpy-dies"

            def seed(self, seed):
                if seed in PART_TWO:
                    os._exit(9)
                super().seed(seed)
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["conformance", "--backend", "dies:DiesInPartTwo", "--backend", REFERENCE, "--results-dir", str(results)]
    # an earlier run's results, which the report would read as this run's
    (results / "numpy-dies").mkdir(parents=True)
    (results / "numpy-dies" / "summary.json").write_text("{}")
    assert main([*argv, "--jobs", "2"]) == 1
    err = capfd.readouterr().err
    assert f"dies:DiesInPartTwo: part 2 of {2 * PARTS_PER_PROCESS} ended with status 9 and saved no results" in err
    assert "removed the earlier results of numpy-dies" in err
    assert not (results / "numpy-dies").exists()
    assert _summary(results, "numpy-reference")["counts"]["failed"] == 0
    assert (results / ".parts").is_dir()


def test_jobs_processes_run_every_part_importing_the_framework_once_each(tmp_path, monkeypatch, capfd):
    """Three adapters, ``--jobs 2``: two processes set up every part of every adapter between them (each
    took the next part when free), an adapter of ``RUN_LAST`` after the others, and every adapter's
    results are whole."""
    (tmp_path / "counted.py").write_text(textwrap.dedent(
        """
        import os

        from xnorm.conformance.adapters.reference import ReferenceAdapter


        class Counted(ReferenceAdapter):
            def setup(self, device):
                with open(os.environ["XNORM_TEST_SETUPS"], "a") as setups:
                    setups.write(f"{os.getpid()} {self.name}\\n")
                super().setup(device)


        class First(Counted):
            name = "numpy-first"


        class Second(Counted):
            name = "numpy-second"


        class Third(Counted):
            name = "numpy-third"
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    setups = tmp_path / "setups.txt"
    monkeypatch.setenv("XNORM_TEST_SETUPS", str(setups))
    results = tmp_path / "results"
    names = ["counted:First", "counted:Second", "counted:Third"]
    monkeypatch.setattr(adapter_registry, "RUN_LAST", ("counted:First",))
    argv = ["conformance", *(arg for name in names for arg in ("--backend", name)), "--results-dir", str(results)]
    assert main([*argv, "--jobs", "2"]) == 0, capfd.readouterr().err
    lines = [line.split() for line in setups.read_text().splitlines()]
    # the two processes start with the first two parts dealt and end with the last two
    assert [name for _, name in lines[:2]] == ["numpy-second"] * 2
    assert [name for _, name in lines[-2:]] == ["numpy-first"] * 2
    every_part = ["numpy-first", "numpy-second", "numpy-third"] * 2 * PARTS_PER_PROCESS
    assert sorted(name for _, name in lines) == sorted(every_part)
    assert len({pid for pid, _ in lines}) == 2
    for name in ("numpy-first", "numpy-second", "numpy-third"):
        assert len(_summary(results, name)["cases"]) == len(catalogue(CATALOGUE_DTYPES))
        assert _summary(results, name)["counts"]["failed"] == 0


def test_each_adapter_of_a_backend_runs_once_even_when_one_shares_the_backends_name(
    tmp_path, adapters, capfd, monkeypatch
):
    # Like torch: a backend "numpy-reference" whose first adapter is also called "numpy-reference".
    from xnorm.conformance import adapters as table

    monkeypatch.setitem(table.ADAPTERS, "numpy-reference", REFERENCE)
    monkeypatch.setitem(table.ADAPTERS, "numpy-noisy", f"{adapters}:Noisy")
    monkeypatch.setitem(table.BACKEND_ADAPTERS, "numpy-reference", ("numpy-reference", "numpy-noisy"))
    results = tmp_path / "results"
    argv = ["conformance", "--backend", "numpy-reference", "--results-dir", str(results), "--jobs", "2"]
    assert main(argv) == 0
    captured = capfd.readouterr()
    parts = 2 * PARTS_PER_PROCESS
    for name in ("numpy-reference", "numpy-noisy"):
        for part in range(1, parts + 1):
            assert captured.err.count(f"running {name} (part {part} of {parts}) on cpu") == 1, captured.err
        assert captured.out.count(f"{name}: ") == 1, captured.out


def test_children_import_this_xnorm_even_with_the_repositorys_source_on_the_path(tmp_path, monkeypatch, capfd):
    # Tests that import examples/ put the repository root on sys.path; its source xnorm/ has no conformance/
    # (that is installed from conformance/), so a child that imported it could not run an adapter.
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    results = tmp_path / "results"
    argv = ["conformance", "--backend", REFERENCE, "--backend", REFERENCE, "--results-dir", str(results)]
    assert main([*argv, "--jobs", "2"]) == 0, capfd.readouterr().err
    assert "ModuleNotFoundError" not in capfd.readouterr().err


def _pytest_conformance(*args: str, results: Path) -> subprocess.CompletedProcess:
    """``pytest conformance ...`` from the repository root, as README.md shows it (the console script: ``python
    -m pytest`` would put the source folders ahead of the installed xnorm)."""
    root = Path(__file__).resolve().parents[2]
    pytest_script = Path(sys.executable).parent / "pytest"
    command = [str(pytest_script), "conformance", *args, "--results-dir", str(results), "-q", "-p", "no:cacheprovider"]
    return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600)


def test_the_pytest_plugin_runs_one_test_per_case_and_saves_the_results(tmp_path):
    run = _pytest_conformance("--backend", REFERENCE, results=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    every_case = catalogue(CATALOGUE_DTYPES)
    ran = catalogue(("float64",))
    assert f"{len(ran)} passed, {len(every_case) - len(ran)} skipped" in run.stdout
    summary = json.loads((tmp_path / "numpy-reference" / "summary.json").read_text())
    assert summary["counts"]["passed"] == len(ran)


def test_the_pytest_plugin_fails_a_run_on_an_absent_device(tmp_path):
    run = _pytest_conformance("--backend", REFERENCE, "--device", "gpu", results=tmp_path)
    assert run.returncode == 1 and "xnorm conformance incomplete: numpy-reference: device(s) gpu absent" in run.stdout
    assert _pytest_conformance("--backend", REFERENCE, "--device", "gpu", "--best-effort", results=tmp_path
                               ).returncode == 0
