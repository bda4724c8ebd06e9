"""Reports: one per adapter run, and the combined report of every saved run with the verdict first.

Backends cannot share an environment (MindSpore needs NumPy < 2, JAX NumPy >= 2), so each run saves
``<results>/<adapter>/summary.json`` and ``arrays.npz``, and :func:`cross_compare` reads every saved
run afterwards and compares the arrays of the cases two adapters have in common.

Every count here uses the four states of :mod:`xnorm.conformance.runner`: passed, failed, xfail
(an expected failure, with its reason) and not-run (with its reason). A worst error is taken only over
checks that ran and were not expected to fail, so an expected failure or a check that never ran can
neither hide nor pose as an error.

The combined report (:func:`write_report`) is ``report.md`` (also printed), ``report.html`` (the same,
with every case linked to its checks, reasons and saved arrays) and ``report.png`` (adapter x check
heatmap of the worst error/allowed, and the pairwise agreement), all under the results folder.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .cases import CATALOGUE_DTYPES, CATALOGUE_REPARAMETRIZATIONS
from .fine_tuning import SAVED_QUANTITY
from .runner import CHECKS, FAILED, NOT_RUN, PASSED, STATES, XFAIL
from .tolerances import TOLERANCE_VERSION, compare, cross_tolerance

__all__ = [
    "ARRAY_QUANTITY",
    "Run",
    "PairResult",
    "adapter_report",
    "load_results",
    "cross_compare",
    "cross_report",
    "verdict",
    "full_report",
    "write_report",
]

# saved array -> quantity in the tolerance table
ARRAY_QUANTITY = {
    "weight": "weight",
    "forward": "forward",
    "grad_g": "gradient",
    "grad_v": "gradient",
    "grad_bias": "gradient",
    "trained_g": "training",
    "trained_v": "training",
    "trained_bias": "training",
    "removed_forward": "forward",
    **SAVED_QUANTITY,
}

#: Reports list torch (the framework everyone ports from) first, then MindSpore, Flax, third parties.
BACKEND_ORDER = ("torch", "mindspore", "flax")
STATE_WORDS = {PASSED: "passed", FAILED: "failed", XFAIL: "expected", NOT_RUN: "not run"}
#: The log of a run's framework output (warnings, compile messages, tracebacks), beside its results.
LOG_NAME = "run.log"


def _fmt(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return "inf" if x == float("inf") else f"{x:.2e}" if x else "0"


def _table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _counts_text(counts: Dict[str, int]) -> str:
    return ", ".join(f"{counts.get(state, 0)} {STATE_WORDS[state]}" for state in STATES)


def _dtype_order(dtype: str) -> int:
    return CATALOGUE_DTYPES.index(dtype) if dtype in CATALOGUE_DTYPES else len(CATALOGUE_DTYPES)


def _ratio_text(check: Optional[dict]) -> str:
    """A check's worst error/allowed; "raised" for a failure without any comparison (the backend raised)."""
    if check is None:
        return "-"
    return "raised" if check["max_abs"] is None and check["ratio"] == float("inf") else _fmt(check["ratio"])


def _worst(checks: List[dict]) -> Optional[dict]:
    """The check with the largest error/allowed among those that ran and were not expected to fail."""
    ran = [c for c in checks if c["state"] in (PASSED, FAILED) and c["ratio"] is not None]
    return max(ran, key=lambda c: c["ratio"], default=None)


def check_rows(summary: dict) -> List[dict]:
    """Per (reparametrization, check, dtype) with at least one case that ran: state counts and the worst
    check with its case id."""
    groups: Dict[Tuple[str, str, str], List[Tuple[str, dict]]] = {}
    for case in summary["cases"]:
        kind = case.get("reparametrization", "weight_norm")
        for name, check in case["checks"].items():
            groups.setdefault((kind, name, case["dtype"]), []).append((case["id"], check))
    rows = []
    for (kind, name, dtype), entries in groups.items():
        counts = dict.fromkeys(STATES, 0)
        for _, check in entries:
            counts[check["state"]] += 1
        if counts[NOT_RUN] == len(entries):
            continue  # a dtype or device that did not run at all: listed under "Not run" with its reason
        worst = _worst([check for _, check in entries])
        worst_id = next((case_id for case_id, check in entries if check is worst), "")
        rows.append(
            {"reparametrization": kind, "check": name, "dtype": dtype, "counts": counts, "worst": worst,
             "worst_id": worst_id}
        )
    rows.sort(key=lambda r: (r["reparametrization"] != "weight_norm", r["reparametrization"],
                             CHECKS.index(r["check"]) if r["check"] in CHECKS else 99, _dtype_order(r["dtype"])))
    return rows


def _grouped_reasons(cases: List[dict], state: str) -> Dict[str, List[str]]:
    """reason -> case ids, for the cases of ``state`` (the case's own reason, else its checks')."""
    reasons: Dict[str, List[str]] = {}
    for case in cases:
        if case["status"] != state:
            continue
        reason = case["reason"].splitlines()[0] if case["reason"] else ""
        if not reason:
            reason = next((c["detail"] for c in case["checks"].values() if c["state"] == state), "")
        reasons.setdefault(reason, []).append(case["id"])
    return reasons


def adapter_report(summary: dict) -> str:
    """One adapter's results: case counts, then per check and dtype its counts and worst error next to
    the tolerance, then the failures, the expected failures and what did not run, each with its reason."""
    versions = ", ".join(f"{k} {v}" for k, v in summary["versions"].items()) or "versions unknown"
    lines = [
        f"## {summary['adapter']} ({versions})",
        "",
        f"devices: {', '.join(summary['devices']) or 'none'}; dtypes run: {', '.join(summary['dtypes'])}; "
        f"tolerance table v{summary['tolerance_version']}; {summary['platform']}",
        "",
        f"cases: {_counts_text(summary['counts'])}",
        "",
    ]
    rows = []
    for row in check_rows(summary):
        worst, counts = row["worst"], row["counts"]
        rows.append(
            [
                row["reparametrization"],
                row["check"],
                row["dtype"],
                worst["quantity"] if worst else "",
                *(str(counts[state]) for state in STATES),
                _fmt(worst["max_abs"]) if worst else "-",
                f"rtol {worst['rtol']:g}, atol {worst['atol']:g}" if worst else "",
                _ratio_text(worst),
                row["worst_id"] if worst and worst["ratio"] else "",
            ]
        )
    if rows:
        header = ["reparametrization", "check", "dtype", "quantity", *(STATE_WORDS[s] for s in STATES)]
        lines.append(_table(header + ["worst abs err", "tolerance", "err/allowed", "worst case"], rows))
    failures = [case for case in summary["cases"] if case["status"] == FAILED]
    if failures:
        lines += ["", f"### Failures ({len(failures)})", ""]
        for case in failures:
            detail = [f"{n}: {c['detail']}" for n, c in case["checks"].items() if c["state"] == FAILED]
            lines.append(f"- `{case['id']}`: " + ("; ".join(detail) or case["reason"].splitlines()[0]))
    for state, title in ((XFAIL, "Expected failures"), (NOT_RUN, "Not run")):
        reasons = _grouped_reasons(summary["cases"], state)
        if reasons:
            total = sum(len(ids) for ids in reasons.values())
            lines += ["", f"### {title} ({total} cases)", ""]
            lines += [f"- {len(ids)} cases (e.g. `{ids[0]}`): {reason}" for reason, ids in reasons.items()]
    if summary.get("log"):
        lines += ["", f"Framework output of this run (warnings, compile messages, tracebacks): `{summary['log']}`"]
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Run:
    """One saved adapter run."""

    summary: dict
    arrays: Dict[str, np.ndarray]
    folder: Path

    @property
    def name(self) -> str:
        return self.summary["adapter"]


def _run_order(summary: dict) -> tuple:
    backend = summary.get("backend", "")
    rank = BACKEND_ORDER.index(backend) if backend in BACKEND_ORDER else len(BACKEND_ORDER)
    return rank, summary["adapter"]


def load_results(results_dir: Path) -> Dict[str, Run]:
    """Every saved adapter run under ``results_dir``, torch first: name -> :class:`Run`."""
    runs = []
    for summary_path in sorted(Path(results_dir).glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        with np.load(summary_path.parent / "arrays.npz") as arrays:
            runs.append(Run(summary, dict(arrays), summary_path.parent))
    runs.sort(key=lambda run: _run_order(run.summary))
    return {run.name: run for run in runs}


@dataclasses.dataclass
class PairResult:
    """Two adapters compared on the cases that passed in both.

    ``rows``: per (quantity, dtype), the arrays compared, how many disagree, and the worst diff/allowed
    with its ``case::array`` key. ``agree`` is true when every compared array is within
    :func:`~xnorm.conformance.tolerances.cross_tolerance`; a pair with no shared case does not agree
    (nothing was shown to agree).
    """

    a: str
    b: str
    cases: int
    rows: List[dict]

    @property
    def agree(self) -> bool:
        return self.cases > 0 and all(row["bad"] == 0 for row in self.rows)

    @property
    def worst(self) -> Optional[dict]:
        return max(self.rows, key=lambda row: row["ratio"], default=None)


def _compare_pair(run_a: Run, run_b: Run) -> PairResult:
    passed_a = {c["id"]: c["dtype"] for c in run_a.summary["cases"] if c["status"] == PASSED}
    passed_b = {c["id"] for c in run_b.summary["cases"] if c["status"] == PASSED}
    shared = sorted(set(passed_a) & passed_b)
    worst: Dict[Tuple[str, str], dict] = {}
    for case_id in shared:
        dtype = passed_a[case_id]
        for array_name, quantity in ARRAY_QUANTITY.items():
            key = f"{case_id}::{array_name}"
            if key not in run_a.arrays or key not in run_b.arrays:
                continue
            rtol, atol = cross_tolerance(dtype, quantity)
            a, b = run_a.arrays[key], run_b.arrays[key]
            if a.shape == b.shape:
                result = compare(a, b, rtol, atol)
            else:
                result = {"max_abs": float("inf"), "ratio": float("inf"), "passed": False}
            entry = worst.setdefault(
                (quantity, dtype),
                {"quantity": quantity, "dtype": dtype, "n": 0, "bad": 0, "ratio": 0.0, "abs": 0.0, "key": "",
                 "tol": (rtol, atol)},
            )
            entry["n"] += 1
            entry["bad"] += not result["passed"]
            if result["ratio"] >= entry["ratio"]:
                entry.update(ratio=result["ratio"], abs=result["max_abs"], key=key)
    rows = sorted(worst.values(), key=lambda r: (r["quantity"], _dtype_order(r["dtype"])))
    return PairResult(run_a.name, run_b.name, len(shared), rows)


def cross_compare(runs: Dict[str, Run]) -> List[PairResult]:
    """Every pair of saved runs compared on the cases that passed in both.

    Two backends may each be one tolerance away from the reference in opposite directions, so pairs
    are compared with :func:`~xnorm.conformance.tolerances.cross_tolerance`. A failure is already
    reported in its own run, so only cases that passed in both are compared.
    """
    return [_compare_pair(a, b) for a, b in itertools.combinations(runs.values(), 2)]


def cross_report(results_dir: Path) -> Tuple[str, bool]:
    """The pairwise comparison's details as markdown; returns (markdown, every pair agrees)."""
    runs = load_results(results_dir)
    text, agree = _cross_markdown(runs, cross_compare(runs))
    return text, agree


def _cross_markdown(runs: Dict[str, Run], pairs: List[PairResult]) -> Tuple[str, bool]:
    lines = ["## Cross-backend agreement (details)", ""]
    if len(runs) < 2:
        lines.append(
            f"Only {len(runs)} adapter run(s) saved ({', '.join(runs) or 'none'}): nothing to compare pairwise. "
            "Run the conformance session of another backend first."
        )
        return "\n".join(lines) + "\n", True
    rows = []
    for pair in pairs:
        if not pair.cases:
            rows.append([f"{pair.a} vs {pair.b}", "-", "-", "0", "-", "-", "-", "no case passed in both"])
        for row in pair.rows:
            rows.append(
                [
                    f"{pair.a} vs {pair.b}",
                    row["quantity"],
                    row["dtype"],
                    f"{row['n'] - row['bad']}/{row['n']}",
                    _fmt(row["abs"]),
                    f"rtol {row['tol'][0]:g}, atol {row['tol'][1]:g}",
                    _fmt(row["ratio"]),
                    row["key"] if row["ratio"] > 0 else "",
                ]
            )
    lines.append(
        _table(["pair", "quantity", "dtype", "agree", "worst abs diff", "tolerance", "diff/allowed", "worst"], rows)
    )
    return "\n".join(lines) + "\n", all(pair.agree for pair in pairs)


def reparametrization_counts(summary: dict) -> Dict[str, Dict[str, int]]:
    """reparametrization -> {state: number of cases}."""
    out: Dict[str, Dict[str, int]] = {}
    for case in summary["cases"]:
        counts = out.setdefault(case.get("reparametrization", "weight_norm"), dict.fromkeys(STATES, 0))
        counts[case["status"]] += 1
    return out


def reparametrization_columns(runs: Dict[str, Run]) -> List[str]:
    """The reparametrizations the runs hold, in the catalogue's order (weight norm first), then any other."""
    present = {r for run in runs.values() for r in reparametrization_counts(run.summary)}
    known = [r for r in CATALOGUE_REPARAMETRIZATIONS if r in present]
    return known + sorted(present - set(CATALOGUE_REPARAMETRIZATIONS))


def _judge(runs: Dict[str, Run], pairs: List[PairResult], best_effort: bool) -> Tuple[str, List[str]]:
    """("PASSED" | "FAILED" | "INCOMPLETE", the reasons for anything but PASSED)."""
    problems, missing = [], []
    for run in runs.values():
        failed = run.summary["counts"].get(FAILED, 0)
        if failed:
            problems.append(f"{run.name}: {failed} case(s) failed")
        absent = run.summary.get("absent_devices", [])
        if absent and not best_effort:
            missing.append(f"{run.name}: requested device(s) {', '.join(absent)} absent, nothing ran there")
        if not run.summary["counts"].get(PASSED, 0) and not run.summary["counts"].get(XFAIL, 0):
            missing.append(f"{run.name}: no case ran")
    problems += [f"{p.a} vs {p.b}: {sum(r['bad'] for r in p.rows)} array(s) disagree" for p in pairs if p.cases and
                 not p.agree]
    if not runs:
        missing.append("no saved run")
    if problems:
        return "FAILED", problems + missing
    return ("INCOMPLETE", missing) if missing else ("PASSED", [])


def verdict(runs: Dict[str, Run], pairs: List[PairResult], *, best_effort: bool = False) -> Tuple[str, str]:
    """The one-screen summary: (markdown, "PASSED" | "FAILED" | "INCOMPLETE").

    A matrix of adapters x reparametrizations with the four states, then one line per pair of adapters:
    the cases compared, whether every array agrees, and the worst diff/allowed.
    """
    word, reasons = _judge(runs, pairs, best_effort)
    lines = [f"**Verdict: {word}**" + (": " + "; ".join(reasons) if reasons else ""), ""]
    reparams = reparametrization_columns(runs)
    rows = []
    for run in runs.values():
        counts = reparametrization_counts(run.summary)
        cells = []
        for reparam in reparams:
            c = counts.get(reparam)
            cells.append(" · ".join(f"{c[s]} {STATE_WORDS[s]}" for s in STATES if c[s]) if c else "-")
        rows.append([f"`{run.name}`", *cells])
    if rows:
        lines += [_table(["adapter", *reparams], rows), ""]
    # Pairs with no case that passed in both (an adapter of another implementation passes none) have
    # nothing to compare: one line names them instead of a row each.
    compared = [pair for pair in pairs if pair.cases]
    pair_rows = []
    for pair in compared:
        worst = pair.worst
        pair_rows.append(
            [
                f"`{pair.a}` vs `{pair.b}`",
                str(pair.cases),
                "yes" if pair.agree else "**no**",
                _fmt(worst["ratio"]) if worst else "-",
                worst["key"] if worst and worst["ratio"] else "",
            ]
        )
    if pair_rows:
        agreeing = sum(pair.agree for pair in compared)
        lines += [
            f"Pairs of adapters that agree on every case both passed: {agreeing} of {len(compared)}.",
            "",
            _table(["pair", "cases compared", "all agree", "worst diff/allowed", "worst"], pair_rows),
            "",
        ]
    idle = len(pairs) - len(compared)
    if idle:
        none_passed = [f"`{run.name}`" for run in runs.values() if not run.summary["counts"].get(PASSED)]
        lines += [
            f"{idle} pair(s) of adapters have no case that passed in both: nothing to compare"
            + (f" ({', '.join(none_passed)} pass no case)." if none_passed else "."),
            "",
        ]
    return "\n".join(lines), word


def full_report(results_dir: Path, *, best_effort: bool = False) -> Tuple[str, bool]:
    """The verdict, then every adapter's report (torch first), then the pairwise details; returns
    (markdown, ok). ``ok`` is false when a case failed, a pair disagrees, nothing was saved or ran, or a
    requested device was absent (unless ``best_effort``)."""
    runs = load_results(results_dir)
    text, word = _markdown(runs, cross_compare(runs), best_effort)
    return text, word == "PASSED"


def _markdown(runs: Dict[str, Run], pairs: List[PairResult], best_effort: bool) -> Tuple[str, str]:
    summary, word = verdict(runs, pairs, best_effort=best_effort)
    parts = [f"# xnorm conformance report (tolerance table v{TOLERANCE_VERSION})", "", summary]
    parts += [adapter_report(run.summary) for run in runs.values()]
    parts.append(_cross_markdown(runs, pairs)[0])
    return "\n".join(parts), word


def write_report(results_dir: Path, output: Optional[Path] = None, *, best_effort: bool = False):
    """Write ``report.md`` (or ``output``), ``report.html`` and ``report.png`` beside it.

    Returns ``(markdown, verdict, written)``, the verdict being "PASSED", "FAILED" or "INCOMPLETE" (see
    :func:`verdict`); ``written`` maps each file kind to its path, or to the reason it
    was not made (the picture needs matplotlib: ``pip install "xnorm[report]"``).
    """
    from .report_figure import report_figure
    from .report_html import html_report

    runs = load_results(results_dir)
    pairs = cross_compare(runs)
    text, word = _markdown(runs, pairs, best_effort)
    md_path = Path(output) if output else Path(results_dir) / "report.md"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    written: Dict[str, str] = {"markdown": str(md_path)}
    png_path = md_path.with_suffix(".png")
    png_path.unlink(missing_ok=True)  # a picture of an earlier run must not stand beside this report
    written["picture"] = report_figure(runs, pairs, png_path)
    html_path = md_path.with_suffix(".html")
    html_path.write_text(html_report(runs, pairs, word, png_path))
    written["html"] = str(html_path)
    return text, word, written
