"""What a conformance run shows on the terminal, and what it keeps out of it.

The frameworks write to the process's file descriptors directly: MindSpore's C++ log (``[ERROR]
ANALYZER`` traces of expected failures, "compiled again" warnings), XLA and absl messages, Python
warnings. :func:`framework_output_to` points descriptors 1 and 2 at a log file for the duration of a
run and hands back a stream to the real terminal, on which :class:`Progress` writes one line every few
seconds. Plain lines rather than a redrawn bar (tqdm, rich): the main consumers are nox and CI logs,
which are not terminals and keep every redraw.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import IO, Iterator

from .runner import FAILED, NOT_RUN, CaseResult

__all__ = ["framework_output_to", "Progress"]


@contextlib.contextmanager
def framework_output_to(path: Path) -> Iterator[IO[str]]:
    """Send everything written to stdout and stderr (by Python or by native code) to ``path`` (appended)
    until the block ends; yields a line-buffered stream to the terminal's stderr.

    Both levels are redirected: descriptors 1 and 2 (native code, subprocesses) and ``sys.stdout`` /
    ``sys.stderr`` (Python code, also where a host such as pytest replaced them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved_err), "w", buffering=1)
    with open(path, "ab") as log, open(path, "a", buffering=1) as log_text:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            with contextlib.redirect_stdout(log_text), contextlib.redirect_stderr(log_text):
                yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            terminal.close()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Called after each case (``progress(result, done, total, runnable)``): prints a failing case at once, and a
    count line at most every ``every`` seconds and at the end, with the time left estimated from the
    pace of the cases that ran so far (cases that are not run take no time)."""

    def __init__(self, name: str, stream: IO[str], *, every: float = 10.0, quiet: bool = False, clock=time.monotonic):
        self.name, self.stream, self.every, self.quiet, self.clock = name, stream, every, quiet, clock
        self.start = self.last = clock()
        self.ran = self.failed = 0

    def __call__(self, result: CaseResult, done: int, total: int, runnable: int) -> None:
        if result.status != NOT_RUN:
            self.ran += 1
        if result.status == FAILED:
            self.failed += 1
            if not self.quiet:
                detail = "; ".join(result.failures()) or result.reason.splitlines()[0]
                self.stream.write(f"  failed: {result.case.id}: {detail}\n")
        now = self.clock()
        if done < total and now - self.last < self.every:
            return
        self.last = now
        line = f"  {self.name}: {done}/{total} cases, {self.failed} failed, {_clock(now - self.start)} elapsed"
        if done < total and self.ran:
            left = max(runnable - self.ran, 0) * (now - self.start) / self.ran
            line += f", about {_clock(left)} left"
        self.stream.write(line + "\n")
