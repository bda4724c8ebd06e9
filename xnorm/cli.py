"""The ``xnorm`` command.

``xnorm info``          the backends, whether each is installed here, and their versions.
``xnorm conformance``   run the conformance suite for the backends installed in this environment
                        (or ``--backend``), save results and print the report.
``xnorm report``        the cross-backend report from every saved run (backends run in separate
                        environments, so this is how their results meet).
"""

from __future__ import annotations

import argparse
import sys
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


def _conformance(args) -> int:
    from .conformance.adapters import adapter_names, installed_adapters, load_adapter
    from .conformance.report import adapter_report
    from .conformance.runner import run_suite

    names = [n for selector in (args.backend or installed_adapters()) for n in adapter_names(selector)]
    if not names:
        print("no backend is installed in this environment; see `xnorm info` for what to install", file=sys.stderr)
        return 2
    ok = True
    for name in names:
        adapter = load_adapter(name)

        def progress(result):
            if not args.quiet and result.status not in ("passed", "not-run", "xfail"):
                print(
                    f"  {result.status}: {result.case.id}: {'; '.join(result.failures()) or result.reason}",
                    file=sys.stderr,
                )

        print(f"running {name} on {', '.join(args.device)} ...", file=sys.stderr)
        suite = run_suite(adapter, devices=args.device, progress=progress)
        folder = suite.save(Path(args.results_dir))
        print(adapter_report(suite.summary()))
        print(f"(saved in {folder})\n")
        ok &= all(result.ok for result in suite.results)
    return 0 if ok else 1


def _report(args) -> int:
    from .conformance.report import full_report

    text, ok = full_report(Path(args.results_dir))
    print(text)
    out = Path(args.output or Path(args.results_dir) / "report.md")
    out.write_text(text)
    print(f"(written to {out})")
    return 0 if ok else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="xnorm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="list backends, installed or not, with versions").set_defaults(run=_info)
    conf = sub.add_parser("conformance", help="run the conformance suite for the installed backends")
    conf.add_argument("--backend", action="append", help="backend, adapter or module:Class (repeatable)")
    conf.add_argument("--device", action="append", help="cpu, gpu or ascend (repeatable; default cpu)")
    conf.add_argument("--results-dir", default=DEFAULT_RESULTS)
    conf.add_argument("--quiet", action="store_true", help="do not list failing cases as they happen")
    conf.set_defaults(run=_conformance)
    report = sub.add_parser("report", help="combine saved results into one report with cross-backend agreement")
    report.add_argument("--results-dir", default=DEFAULT_RESULTS)
    report.add_argument("--output", help="markdown file to write (default: <results-dir>/report.md)")
    report.set_defaults(run=_report)
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
