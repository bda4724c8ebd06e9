"""One virtualenv per backend: MindSpore needs NumPy < 2 and JAX NumPy >= 2, so they never share one.

    nox -t test     lint, every backend's tests and conformance suite, then the cross-backend comparison
    nox -t report   every backend's conformance run, then the combined report (conformance-results/report.md)
    nox -s tests-torch / tests-mindspore / tests-flax / cross / lint
    nox -t compat   each backend's tests and conformance at its framework's oldest and newest release
                    (constraints/compat/; not in the test tag)
    nox -s bench    every backend's benchmarks (each in its own environment), then the ratio report and plot

Backends compare through files: each run saves conformance-results/<adapter>/, and `cross` reads them.
Pass a device to the conformance runs with `nox -t report -- --device gpu`; a device that is absent
fails the run (its cases are reported not run) unless `--best-effort` is passed too.
"""

import os
import subprocess
import sys
from pathlib import Path

import nox

nox.options.error_on_missing_interpreters = True
# uv builds each environment in seconds where pip takes a minute or more (the README installs nox[uv]);
# plain virtualenv + pip where uv is absent.
nox.options.default_venv_backend = "uv|virtualenv"

# pip's settings that uv must share: uv reads no pip configuration, so on a machine whose pip takes
# wheels from a local folder or extra indexes (a CPU-only torch wheel; an unpinned torch from PyPI is the
# CUDA build, several GB) uv would resolve elsewhere. Variables already set win.
PIP_TO_UV = {
    "index-url": "UV_INDEX_URL",
    "extra-index-url": "UV_EXTRA_INDEX_URL",
    "find-links": "UV_FIND_LINKS",
    "constraint": "UV_CONSTRAINT",
}


def _share_pip_configuration_with_uv() -> None:
    try:
        listing = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        variable = PIP_TO_UV.get(key.rpartition(".")[2])
        if variable and variable not in os.environ:
            os.environ[variable] = value.strip().strip("'\"")
    if "UV_EXTRA_INDEX_URL" in os.environ or "UV_FIND_LINKS" in os.environ:
        # pip takes the best version from any index; uv by default only from the first that has the package
        os.environ.setdefault("UV_INDEX_STRATEGY", "unsafe-best-match")


_share_pip_configuration_with_uv()

ROOT = Path(__file__).parent
RESULTS = str(ROOT / "conformance-results")
BACKENDS = ("torch", "mindspore", "flax")
# torch rides along in every environment: the torch tests are the reference for porting checks.
# The torch environment also draws the report's picture in the tests (MindSpore's NumPy < 2 is older than
# the pinned matplotlib wants).
EXTRAS = {"torch": "torch,test,report", "mindspore": "mindspore,torch,test", "flax": "flax,torch,test"}


# Python may write the bytecode of what a session imports into the session's own environment. uv installs
# none (pip compiles it at install), so where Python is told not to write any (PYTHONDONTWRITEBYTECODE=1, as
# on this project's machines) every process compiled torch's, MindSpore's or JAX's modules from source again:
# about 3 s of CPU per process, two or three processes per run. `xnorm conformance --backend torch` in a built
# environment: 30.7 s without, 24.3 s with the bytecode an earlier run wrote (2026-12-03). (Compiling all of
# it at install, uv's --compile-bytecode, took the Flax environment from 5 s to 16 s.)
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def _install(session, backend):
    session.install("-c", f"constraints/{backend}-cpu.txt", f".[{EXTRAS[backend]}]")


def _device_args(session):
    return list(session.posargs) or ["--device", "cpu"]


#: pytest-xdist workers for the unit tests: their time is compiling (XLA, MindSpore graphs), one core
#: each. At most 4, for memory (each worker imports its framework and keeps its compiled programs).
PYTEST_WORKERS = min(os.cpu_count() or 1, 4)


def _pytest_parallel():
    """``(arguments, env)`` running pytest on :data:`PYTEST_WORKERS` processes, a test file per process
    (its module fixtures and compiled programs stay with it), each with its share of the cores for
    OpenMP (one pool of every core per process ran about 3x slower than one process, see --jobs)."""
    arguments = ["-n", str(PYTEST_WORKERS), "--dist", "loadfile"] if PYTEST_WORKERS > 1 else []
    return arguments, {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // PYTEST_WORKERS))}


@nox.session(tags=["test"])
def lint(session):
    session.install("ruff==0.17.6")
    session.run("ruff", "check", "xnorm", "backends", "conformance", "tests", "examples", "benchmarks", "noxfile.py")


for _backend in BACKENDS:

    @nox.session(name=f"tests-{_backend}", tags=["test"])
    def tests(session, backend=_backend):
        """Core tests, the backend's own tests and its conformance catalogue (results saved for `cross`).

        The catalogue runs through ``xnorm conformance``, each adapter's cases dealt out to one process per
        core, not ``pytest conformance`` (one process): the same cases, checks and exit status in half the
        time; tests/core checks the pytest plugin itself on the NumPy reference adapter."""
        _install(session, backend)
        # tests/core runs in every environment (what it checks depends on what is installed there: "import
        # xnorm imports no framework", the README's per-framework lines), except the CLI's own machinery,
        # which runs NumPy adapters only and takes minutes: once, in the torch session.
        core = ["tests/core"] if backend == "torch" else ["tests/core", "--ignore=tests/core/test_conformance_cli.py"]
        # -m "not extended": the extra launchers and modes of the distributed tests (nox -s distributed)
        parallel, env = _pytest_parallel()
        session.run("pytest", *core, f"tests/{backend}", "-q", "-m", "not extended", *parallel, env=env)
        # xnorm's own adapters: the other implementations' (torch's and Flax's own weight norms, mindspore-assign)
        # show how they depart from the spec, in the report (nox -t report), and would add 4 minutes here
        session.run("xnorm", "conformance", "--backend", backend, "--xnorm-only", "--results-dir", RESULTS,
                    *_device_args(session))

    @nox.session(name=f"conformance-{_backend}", tags=["report"])
    def conformance(session, backend=_backend):
        """The backend's conformance report (markdown on the terminal, files under conformance-results/)."""
        _install(session, backend)
        session.run("xnorm", "conformance", "--backend", backend, "--results-dir", RESULTS, *_device_args(session))


#: the oldest and the newest release of each backend's framework installable here, pinned in
#: constraints/compat/<backend>-<which>.txt; the pinned one (constraints/<backend>-cpu.txt) is what
#: tests-<backend> runs. Not in the test tag: CI runs the pinned versions only.
COMPAT_VERSIONS = ("oldest", "newest")
COMPAT_RESULTS = ROOT / "conformance-results-compat"
#: what a compat session prints before testing, so that its log says which versions ran
COMPAT_PACKAGES = {
    "torch": ("torch", "numpy"),
    "mindspore": ("mindspore", "numpy"),
    "flax": ("jax", "jaxlib", "flax", "optax", "numpy"),
}

for _backend in BACKENDS:
    for _which in COMPAT_VERSIONS:

        @nox.session(name=f"compat-{_backend}-{_which}", tags=["compat"])
        def compat(session, backend=_backend, which=_which):
            """The backend's tests and conformance catalogue at its framework's oldest or newest release
            (`nox -t compat` runs all six); results under conformance-results-compat/<backend>-<which>/,
            which `cross` never reads."""
            constraints = f"constraints/compat/{backend}-{which}.txt"
            # torch.compile's inductor imports setuptools, which torch 2.4 does not declare on Python < 3.12
            # and a uv environment lacks
            extra = ["setuptools"] if backend == "torch" else []
            # this file replaces any constraints pip and uv were given for the whole machine (a cap on torch,
            # say): the point of the session is the release pinned in it
            session.install("-c", constraints, f".[{EXTRAS[backend]}]", *extra,
                            env={"UV_CONSTRAINT": constraints, "PIP_CONSTRAINT": constraints})
            packages = COMPAT_PACKAGES[backend]
            session.run("python", "-c", "import importlib.metadata as m; "
                        f"print(*(p + '==' + m.version(p) for p in {packages!r}))")
            results = str(COMPAT_RESULTS / f"{backend}-{which}")
            failed = []
            for command in (
                # as in tests-<backend>; the CLI's own machinery (NumPy adapters only) runs once, in tests-torch
                ["pytest", "tests/core", "--ignore=tests/core/test_conformance_cli.py", f"tests/{backend}", "-q",
                 "-m", "not extended"],
                ["xnorm", "conformance", "--backend", backend, "--results-dir", results, *_device_args(session)],
            ):
                try:  # the catalogue runs even where a unit test failed: the matrix wants both verdicts
                    session.run(*command)
                except nox.command.CommandFailed:
                    failed.append(command[0])
            if failed:
                session.error(f"{' and '.join(failed)} failed at the {which} {backend} release")


@nox.session(tags=["test", "report"])
def cross(session):
    """Compare every saved backend run pairwise; writes conformance-results/report.md, .html and .png."""
    session.install("-c", "constraints/report.txt", ".[report]")
    best_effort = ["--best-effort"] if "--best-effort" in session.posargs else []
    session.run("xnorm", "report", "--results-dir", RESULTS, *best_effort)


BENCH_RESULTS = str(ROOT / "benchmarks" / "results")


for _backend in BACKENDS:

    @nox.session(name=f"bench-{_backend}", tags=["bench"])
    def bench_backend(session, backend=_backend):
        """Timings of one backend (plain, xnorm, xnorm fused, native), plus conversion where it applies."""
        _install(session, backend)
        session.run("python", f"benchmarks/bench_{backend}.py", "--results-dir", BENCH_RESULTS, *session.posargs)
        if backend == "mindspore":
            # the same timings with MindSpore's graph kernel fusion, whose CPU compiler needs `decorator`
            session.install("-c", "constraints/mindspore-cpu.txt", "decorator")
            session.run("python", "benchmarks/bench_mindspore.py", "--graph-kernel", "--results-dir", BENCH_RESULTS,
                        *session.posargs)
        if backend != "torch":
            quick = ["--quick"] if "--quick" in session.posargs else []
            session.run(
                "python", "benchmarks/bench_convert.py", "--to", backend, "--results-dir", BENCH_RESULTS, *quick
            )


@nox.session(name="bench-report")
def bench_report(session):
    """Ratio tables (markdown, JSON), the plot, and docs/performance.md from benchmarks/results/."""
    session.install("matplotlib==3.11.2", "numpy")
    session.run("python", "benchmarks/report.py", "--results-dir", BENCH_RESULTS, "--docs", "docs/performance.md")


@nox.session
def bench(session):
    """Every benchmark, side by side per backend in its own environment, then the report:
    `nox -s bench` (or `nox -s bench -- --quick` for a smoke run)."""
    for backend in BACKENDS:
        session.notify(f"bench-{backend}", session.posargs)
    session.notify("bench-report")


for _backend in BACKENDS:

    @nox.session(name=f"fuzz-{_backend}")
    def fuzz_backend(session, backend=_backend):
        """The backend's fuzzed agreement tests with the large budget (tests/fuzz_strategies.py); a failure is
        saved, shrunk, under tests/fuzz-examples/, and CI replays it once that folder is committed."""
        _install(session, backend)
        core = ["tests/core/test_fuzz_layouts.py"] if backend == "torch" else []
        session.run("pytest", *core, f"tests/{backend}/test_fuzz.py", "-q", *session.posargs,
                    env={"XNORM_FUZZ_PROFILE": "large"})


@nox.session
def fuzz(session):
    """Every backend's fuzzed agreement tests with the large budget, each in its own environment:
    `nox -s fuzz` (not in the test or report tags; CI runs the same tests with a small fixed budget)."""
    for backend in BACKENDS:
        session.notify(f"fuzz-{backend}", session.posargs)


#: each backend's tests of training on several processes or devices (docs/distributed.md); they also run in
#: tests-<backend>, with everything else
DISTRIBUTED_TESTS = {
    "torch": ["tests/torch/test_distributed.py"],
    "mindspore": ["tests/mindspore/test_distributed.py", "tests/mindspore/test_sharded_torch_checkpoint.py"],
    "flax": [
        "tests/flax/test_sharding.py", "tests/flax/test_partitioning.py", "tests/flax/test_sharded_torch_checkpoint.py",
    ],
}

for _backend in BACKENDS:

    @nox.session(name=f"distributed-{_backend}")
    def distributed_backend(session, backend=_backend):
        """The backend's multi-process / multi-device tests alone."""
        if not DISTRIBUTED_TESTS[backend]:
            session.error(f"{backend} has no distributed tests yet (docs/distributed.md)")
        _install(session, backend)
        session.run("pytest", *DISTRIBUTED_TESTS[backend], "-q", *session.posargs)


@nox.session
def distributed(session):
    """Every backend's distributed tests, each in its own environment: `nox -s distributed`."""
    for backend in BACKENDS:
        if DISTRIBUTED_TESTS[backend]:
            session.notify(f"distributed-{backend}", session.posargs)
