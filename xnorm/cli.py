"""The ``xnorm`` command.

``xnorm info``          the backends, whether each is installed here, and their versions.
``xnorm conformance``   run the conformance suite for the backends installed in this environment
                        (or ``--backend``), save results and print the report.
``xnorm report``        the cross-backend report from every saved run (backends run in separate
                        environments, so this is how their results meet).
``xnorm convert``       convert a checkpoint between torch and MindSpore or Flax (see xnorm.convert), with a
                        progress bar on large checkpoints, a summary of what was mapped, and an atomic write.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import List, Optional

from . import __version__
from .registry import backends

DEFAULT_RESULTS = "conformance-results"


def _info(args) -> int:
    print(f"xnorm {__version__}")
    for row in backends():
        print(f"  {row}")
    return 0


#: Exit status of a conformance run or report in which a requested device was absent or nothing ran
#: (1 is a failure, 2 a usage error); ``--best-effort`` turns an absent device into a note.
EXIT_INCOMPLETE = 3


def _conformance(args) -> int:
    from .conformance.adapters import OTHER_IMPLEMENTATIONS, adapter_names, installed_adapters

    if args.parts_from_stdin:
        return _serve_parts(args)

    # each adapter once, however often it was named (its parts would share their folders)
    selectors = args.backend or installed_adapters()
    names = list(dict.fromkeys(name for selector in selectors for name in adapter_names(selector)))
    if args.xnorm_only:
        names = [name for name in names if name not in OTHER_IMPLEMENTATIONS]
    if not names:
        print("no backend is installed in this environment; see `xnorm info` for what to install", file=sys.stderr)
        return 2
    if args.jobs is not None and args.jobs < 1:
        from .errors import OptionError

        raise OptionError(f"--jobs {args.jobs}: give at least 1 (processes side by side, each running a part of "
                          "an adapter's catalogue).")
    jobs = args.jobs or os.cpu_count() or 1
    codes = _adapters_in_processes(names, args, jobs) if jobs > 1 else [_run_adapter(name, args) for name in names]
    # a failure outweighs an incomplete run, which outweighs anything else
    return next((code for code in (1, EXIT_INCOMPLETE) if code in codes), max(codes))


def _parse_part(text: Optional[str]):
    """``"K/N"`` (1-based) as ``(K - 1, N)``; None for the whole catalogue."""
    if text is None:
        return None
    from .errors import OptionError

    try:
        part, parts = (int(number) for number in text.split("/"))
    except ValueError:
        part = parts = 0
    if not 1 <= part <= parts:
        raise OptionError(f"--part {text}: give K/N with 1 <= K <= N (part K of the catalogue dealt in N parts).")
    return part - 1, parts


def _run_adapter(name: str, args) -> int:
    """Run one adapter's catalogue (or the part ``--part`` names) in this process, save it and print its
    counts; the exit status."""
    from .conformance.adapters import load_adapter
    from .conformance.cases import catalogue
    from .conformance.console import Progress, framework_output_to
    from .conformance.report import LOG_NAME
    from .conformance.runner import CATALOGUE_DTYPES, run_suite
    from .conformance.shards import part_of

    part = _parse_part(getattr(args, "part", None))
    target = name
    adapter = load_adapter(name)
    name = adapter.name  # a third-party adapter given as module:Class saves under its own name
    folder = Path(args.results_dir) / name
    cases = catalogue(CATALOGUE_DTYPES, args.device)
    label, save_to = name, Path(args.results_dir)
    if part is not None:  # saved apart; the process that started the parts merges them and judges the whole
        cases = part_of(cases, *part)
        label = f"{name} (part {part[0] + 1} of {part[1]})"
        save_to = _part_folder(Path(args.results_dir), target, *part)
    log = save_to / name / LOG_NAME
    log.unlink(missing_ok=True)
    print(f"running {label} on {', '.join(args.device)}; its framework output goes to {folder / LOG_NAME}",
          file=sys.stderr)
    with framework_output_to(log) as terminal:
        suite = run_suite(adapter, devices=args.device, cases=cases,
                          progress=Progress(label, terminal, quiet=args.quiet))
    suite.save(save_to, log=f"{name}/{LOG_NAME}")
    if part is not None:
        return 0
    return _verdict(suite.summary(), folder, args)


#: how a ``--parts-from-stdin`` process tells the one that started it that a part ended, and with which
#: status: a line of its own on stdout (the frameworks' output goes to the adapter's log meanwhile)
PART_ENDED = "xnorm-conformance-part-ended"


def _serve_parts(args) -> int:
    """Run parts as ``--jobs`` hands them out, one per line of stdin (``<adapter>\t<K>/<N>``), in this
    process, one after another; after each, a :data:`PART_ENDED` line with its status on stdout. Ends at
    the end of stdin."""
    import traceback

    for line in sys.stdin:
        target, _, part = line.rstrip("\n").partition("\t")
        try:
            status = _run_adapter(target, argparse.Namespace(**{**vars(args), "part": part}))
        except Exception:  # the part saved nothing; the parts after it still run
            traceback.print_exc()
            status = 1
        print(f"{PART_ENDED} {status}", flush=True)
    return 0


def _part_folder(results_dir: Path, target: str, part: int, parts: int) -> Path:
    """Where part ``part`` (0-based) of the adapter ``target`` (a name or module:Class) saves its results."""
    from .conformance.shards import PARTS_FOLDER

    slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in target)
    return results_dir / PARTS_FOLDER / slug / f"{part + 1}-of-{parts}"


def _verdict(summary: dict, folder: Path, args) -> int:
    """Print an adapter's counts (and why its run is incomplete, if it is); its exit status."""
    from .conformance.report import STATE_WORDS
    from .conformance.runner import FAILED, NOT_RUN

    name, counts = summary["adapter"], summary["counts"]
    print(f"{name}: " + ", ".join(f"{n} {STATE_WORDS[state]}" for state, n in counts.items())
          + f" (report: {folder / 'report.md'})")
    if counts[FAILED]:
        print(f"xnorm conformance: {name}: {counts[FAILED]} case(s) failed", file=sys.stderr)
        return 1
    problems = []
    absent = summary["absent_devices"]
    if absent and not args.best_effort:
        problems.append(f"device(s) {', '.join(absent)} absent")
    if counts[NOT_RUN] == len(summary["cases"]):
        problems.append("no case ran")
    if problems:
        print(
            f"xnorm conformance: {name}: incomplete, {'; '.join(problems)}: nothing was checked where it was asked "
            "for (add --best-effort to report what can run and exit 0)",
            file=sys.stderr,
        )
        return EXIT_INCOMPLETE
    return 0


#: parts of each adapter per process of ``--jobs``: parts of equal case counts differ in time (one of
#: ``mindspore-graph``'s two parts took 22 s longer than the other), and smaller ones let the process
#: that is free first take the next, so no core idles at the end. Measured on this project's 2-core
#: machine (2026-12-03), ``xnorm conformance --backend mindspore``: 188 s with 1, 174 s with 3.
PARTS_PER_PROCESS = 3


def _adapters_in_processes(names: List[str], args, jobs: int) -> List[int]:
    """Each adapter in ``jobs * PARTS_PER_PROCESS`` parts, run by ``jobs`` processes side by side
    (``xnorm conformance --parts-from-stdin``), each taking the next part not yet taken when it is free;
    then each adapter's parts merged into its results folder (:mod:`xnorm.conformance.shards`).

    Compiling (MindSpore graphs, XLA programs) dominates a run and uses one core, so processes side by
    side use a multi-core machine; parts rather than whole adapters keep every core busy to the end (one
    adapter may take as long as the others together). A process runs part after part, so the framework
    is imported ``jobs`` times, not once per part (about 3 s of CPU each), and a backend's later adapters
    find the programs its earlier ones compiled (JAX's in-memory cache: Flax's own weight norm's
    adapters ran in 35 s instead of 94). A backend's process-wide settings reach its later adapters in
    a process (MindSpore's synchronous launching, which ``mindspore-pynative`` turns on); every saved
    array of every adapter was bit-equal to a process per part (2026-12-03). Parts are dealt adapter by
    adapter in :func:`~xnorm.conformance.adapters.run_order` (MindSpore's GRAPH_MODE adapter last: later
    adapters ran slower in its processes). A process whose part ends it (a crash) is replaced for the
    parts left. Progress lines reach this terminal as the children write them; each adapter's counts are
    printed in the adapters' order once all ended.
    """
    import queue
    from concurrent.futures import ThreadPoolExecutor

    from .conformance.adapters import ADAPTERS, run_order
    from .conformance.cases import catalogue
    from .conformance.report import LOG_NAME
    from .conformance.runner import CATALOGUE_DTYPES
    from .conformance.shards import PARTS_FOLDER, merge_parts

    shared = ["--jobs", "1"]
    shared += [arg for device in args.device for arg in ("--device", device)]
    shared += ["--quiet"] * args.quiet + ["--best-effort"] * args.best_effort
    # A child imports what this process imports (a third-party adapter included): this import path, led
    # by the folder this xnorm came from, and without the working directory `python -c` puts first; a
    # repository's source xnorm/ (no conformance/ inside) must never shadow the installed package.
    package_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, *filter(None, sys.path)]))
    # Each child's OpenMP pool gets its share of the cores: torch's CPU kernels, two processes each spinning
    # a pool of every core, ran 3x slower than one process alone. A setting of the user's stays.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    child = "import sys; sys.path[0] == '' and sys.path.pop(0); from xnorm.cli import main; sys.exit(main())"
    parts_root = Path(args.results_dir) / PARTS_FOLDER
    shutil.rmtree(parts_root, ignore_errors=True)
    # module:Class, never the name: "torch" alone would mean the torch backend, both its adapters.
    targets = [ADAPTERS.get(name, name) for name in names]
    parts = jobs * PARTS_PER_PROCESS
    units = [(names.index(name), part) for name in run_order(names) for part in range(parts)]

    def unit_folder(index: int, part: int) -> Path:
        return _part_folder(Path(args.results_dir), targets[index], part, parts)

    command = [sys.executable, "-c", child, "conformance", "--parts-from-stdin", "--results-dir", args.results_dir,
               *shared]
    waiting: queue.SimpleQueue = queue.SimpleQueue()
    for unit in units:
        waiting.put(unit)
    finished: dict = {}

    def ended(process) -> Optional[int]:
        """The status of the part ``process`` was given, from its stdout (anything else it prints
        passes through); None when the process ended first."""
        for line in process.stdout:
            if line.startswith(PART_ENDED):
                return int(line.split()[1])
            sys.stdout.write(line)
        return None

    def serve(_):
        process = None
        while True:
            try:
                unit = waiting.get_nowait()
            except queue.Empty:
                break
            if process is None:
                process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            index, part = unit
            try:
                process.stdin.write(f"{targets[index]}\t{part + 1}/{parts}\n")
                process.stdin.flush()
                status = ended(process)
            except BrokenPipeError:
                status = None
            if status is None:  # the process ended in this part: a fresh one takes the next
                status = process.wait()
                process = None
            finished[unit] = status
        if process is not None:
            process.stdin.close()
            for line in process.stdout:
                sys.stdout.write(line)
            process.wait()

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(serve, range(jobs)))
    order = [case.id for case in catalogue(CATALOGUE_DTYPES, args.device)]
    codes, incomplete = [], False
    for index, name in enumerate(names):
        saved = [list(unit_folder(index, part).glob("*/summary.json")) for part in range(parts)]
        lost = [part for part in range(parts) if len(saved[part]) != 1]
        if not lost:
            folders = [found[0].parent for found in saved]
            target = Path(args.results_dir) / folders[0].name
            codes.append(_verdict(merge_parts(folders, target, order, LOG_NAME), target, args))
            continue
        incomplete = True
        codes.append(1)
        for part in lost:
            print(f"xnorm conformance: {name}: part {part + 1} of {parts} ended with status "
                  f"{finished[(index, part)]} and saved no results (its output is under "
                  f"{unit_folder(index, part)})", file=sys.stderr)
        # an earlier run's results must not stand in for this one's in the report
        known = {found[0].parent.name for found in saved if len(found) == 1} | ({name} & set(ADAPTERS))
        for stale in known:
            if (Path(args.results_dir) / stale / "summary.json").exists():
                shutil.rmtree(Path(args.results_dir) / stale)
                print(f"xnorm conformance: removed the earlier results of {stale}", file=sys.stderr)
    if not incomplete:  # else kept, for the output of the part that saved nothing
        shutil.rmtree(parts_root, ignore_errors=True)
    return codes


def _report(args) -> int:
    from .conformance.report import write_report

    text, word, written = write_report(
        Path(args.results_dir), Path(args.output) if args.output else None, best_effort=args.best_effort
    )
    # The verdict is the first screen of the report; the details are in the files (or --full).
    print(text if args.full else text.split("\n## ", 1)[0].rstrip() + "\n")
    for kind, where in written.items():
        print(f"({kind}: {where})")
    return {"PASSED": 0, "FAILED": 1}.get(word, EXIT_INCOMPLETE)


#: Checkpoints at least this large get a progress bar (smaller ones convert in a blink).
PROGRESS_THRESHOLD_BYTES = 64 * 2**20
OUTPUT_SUFFIXES = {"mindspore": (".ckpt",), "flax": (".msgpack",), "torch": (".safetensors", ".pt", ".pth")}


def _like_arguments(pairs) -> dict:
    """``--like-arg KEY=VALUE`` pairs as keyword arguments: VALUE read as JSON (numbers, true, lists,
    objects, quoted strings) and otherwise taken as the string it is (``config=v1``)."""
    import json

    from .errors import OptionError

    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise OptionError(f"--like-arg {pair!r} must be NAME=VALUE, e.g. --like-arg config=v1 or --like-arg "
                              "channels=512.")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _resolve_like(spec: str, kwargs: Optional[dict] = None):
    """``module:attribute`` -> the object, called (with ``kwargs``) when callable (a factory)."""
    from .errors import OptionError

    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise OptionError(f"--like {spec!r} must be module:factory, e.g. --like mymodels.vocoder:build_generator.")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules next to the user are importable
    try:
        obj = importlib.import_module(module_name)
    except ImportError as error:
        missing = getattr(error, "name", None)
        if missing and module_name != missing and not module_name.startswith(missing + "."):
            # the module was found; something it imports is not installed here
            raise OptionError(
                f"--like {spec!r}: {module_name!r} was found but importing it failed: it needs {missing!r}, which "
                f"is not installed in this environment ({error}). Install it, or run in the environment that has it."
            ) from None
        raise OptionError(
            f"--like {spec!r}: cannot import {module_name!r} ({error}). Run from the folder that "
            "holds it, or install it."
        ) from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise OptionError(f"--like {spec!r}: {module_name!r} has no attribute {attribute!r}.")
        obj = getattr(obj, part)
    # A factory (function, class, functools.partial) is called; a model object (modules are callable too) is used as is.
    factory = inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismethod(obj) or isinstance(obj, partial)
    if not factory:
        if kwargs:
            raise OptionError(f"--like {spec!r} is a model object, not a factory: it takes no --like-arg.")
        return obj
    try:
        inspect.signature(obj).bind(**(kwargs or {}))
    except TypeError as error:
        raise OptionError(f"--like {spec!r} cannot be called with {kwargs or 'no arguments'}: {error}. "
                          "Pass its arguments as --like-arg NAME=VALUE.") from None
    except ValueError:  # no signature to check (a builtin): the call says what is wrong
        pass
    return obj(**(kwargs or {}))


class _ProgressBar:
    """A bar redrawn in place on a terminal; elsewhere (a log file, CI) one line per tenth of the work,
    since a carriage return there only piles every update onto one line."""

    def __init__(self, enabled: bool, *, stream=None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self.last = 0.0
        self.tenths = -1

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        fraction = done / max(total, 1)
        if self.terminal:
            if done < total and now - self.last < 0.2:
                return
        elif int(10 * fraction) == self.tenths and done < total:
            return
        self.last, self.tenths = now, int(10 * fraction)
        width = 30
        filled = int(width * fraction)
        rate = done / 2**20 / max(now - self.start, 1e-9)
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {100 * fraction:5.1f}% "
                f"{done / 2**20:8.1f}/{total / 2**20:.1f} MiB {rate:7.1f} MiB/s")
        if self.terminal:
            self.stream.write("\r" + line + ("\n" if done >= total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _convert(args) -> int:
    from . import porting
    from .errors import OptionError

    output = os.path.abspath(args.output)
    if os.path.exists(args.source) and os.path.exists(output) and os.path.samefile(args.source, output):
        raise OptionError(f"-o {args.output!r} is the source file; write the converted checkpoint elsewhere.")
    suffixes = OUTPUT_SUFFIXES[args.to]
    if not output.endswith(suffixes):
        raise OptionError(f"-o {args.output!r}: a {args.to} checkpoint is written as {' or '.join(suffixes)}.")
    # before --like imports the user's model (and with it a framework, 15 s for MindSpore)
    if not os.path.exists(args.source):
        from .errors import CheckpointFileError

        raise CheckpointFileError(f"checkpoint file {args.source!r} does not exist.")
    if not os.path.isdir(os.path.dirname(output)):
        folder = os.path.dirname(output)
        raise OptionError(f"-o {args.output!r}: the folder {folder!r} does not exist; create it first.")
    rename = {}
    for rule in args.rename or ():
        pattern, sep, replacement = rule.partition("=")
        if not sep:
            raise OptionError(f"--rename {rule!r} must be REGEX=REPLACEMENT.")
        rename[pattern] = replacement
    like = _resolve_like(args.like, _like_arguments(args.like_arg))
    plan, target = porting._plan(
        args.source, to=args.to, like=like, rename=rename or None, cast=args.cast, hint_style="cli", entry=args.entry
    )
    show = not args.quiet and (args.progress or plan.nbytes >= PROGRESS_THRESHOLD_BYTES)
    porting._write(plan, target, like, output, progress=_ProgressBar(show))
    if not args.quiet:
        print(plan.summary())
        print(f"wrote {args.output} ({os.path.getsize(output) / 2**20:.1f} MiB)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="xnorm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="list backends, installed or not, with versions").set_defaults(run=_info)
    conf = sub.add_parser("conformance", help="run the conformance suite for the installed backends")
    conf.add_argument("--backend", action="append", help="backend, adapter or module:Class (repeatable)")
    conf.add_argument("--device", action="append", help="cpu, gpu or ascend (repeatable; default cpu)")
    conf.add_argument("--results-dir", default=DEFAULT_RESULTS)
    conf.add_argument("--quiet", action="store_true", help="do not list failing cases as they happen")
    best_effort = "report what can run and exit 0 when a requested device is absent (it is still reported not run)"
    conf.add_argument("--best-effort", action="store_true", help=best_effort)
    conf.add_argument(
        "--jobs", type=int, default=None,
        help="processes side by side (default: cores); each adapter's catalogue is dealt out in parts (three per "
        "process), each process takes the next part when free, and the parts' results are merged (1: every "
        "adapter in this process)",
    )
    conf.add_argument(
        "--part", metavar="K/N",
        help="run only part K of the catalogue dealt in N parts, and save it without a verdict (what --jobs "
        "gives each process)",
    )
    conf.add_argument(
        "--parts-from-stdin", action="store_true",
        help="run the parts named on stdin, one per line (<adapter>TAB<K>/<N>), one after another (what --jobs "
        "gives each process)",
    )
    conf.add_argument(
        "--xnorm-only", action="store_true",
        help="leave out the adapters of other implementations (the frameworks' own weight norms, mindspore-assign)",
    )
    conf.set_defaults(run=_conformance)
    report = sub.add_parser("report", help="combine saved results into one report with cross-backend agreement")
    report.add_argument("--results-dir", default=DEFAULT_RESULTS)
    report.add_argument(
        "--output", help="markdown file to write (default: <results-dir>/report.md); .html and .png go beside it"
    )
    report.add_argument("--best-effort", action="store_true", help=best_effort)
    report.add_argument("--full", action="store_true", help="print the whole report, not only the verdict")
    report.set_defaults(run=_report)
    convert = sub.add_parser("convert", help="convert a checkpoint between torch and MindSpore or Flax, strictly")
    convert.add_argument("source", help=".safetensors/.pt (torch), .ckpt (MindSpore) or .msgpack (Flax)")
    convert.add_argument("--to", required=True, choices=("mindspore", "flax", "torch"))
    convert.add_argument("--like", required=True, help="module:factory giving the target model (names and shapes)")
    convert.add_argument("-o", "--output", required=True, help="file to write (.ckpt, .msgpack, .safetensors or .pt)")
    convert.add_argument(
        "--rename",
        action="append",
        metavar="REGEX=REPLACEMENT",
        help="applied to each key derived from the target to give the source key (repeatable)",
    )
    convert.add_argument(
        "--like-arg",
        action="append",
        metavar="NAME=VALUE",
        help="keyword argument of the --like factory, VALUE as JSON or a plain string (repeatable)",
    )
    convert.add_argument(
        "--entry",
        metavar="KEY",
        help="the state dict to convert when the checkpoint holds several ({'generator': ..., 'optimizer': ...})",
    )
    convert.add_argument("--cast", action="store_true", help="cast floating tensors to the target's dtypes")
    bar = convert.add_mutually_exclusive_group()
    bar.add_argument("--progress", action="store_true", help="always show the progress bar")
    bar.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    convert.set_defaults(run=_convert)
    args = parser.parse_args(argv)
    if getattr(args, "device", "unset") is None:
        args.device = ["cpu"]
    try:
        return args.run(args)
    except Exception as error:  # an XnormError or a broken results folder: say it plainly
        from .errors import XnormError

        if isinstance(error, XnormError):
            print(f"xnorm: error: {error}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
