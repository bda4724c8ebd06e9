"""Markdown reports: one per adapter run, and the cross-backend comparison of saved results.

Backends cannot share an environment (MindSpore needs NumPy < 2, JAX NumPy >= 2), so each run saves
``<results>/<adapter>/summary.json`` and ``arrays.npz``, and :func:`cross_report` reads every saved
run afterwards and compares the arrays of the cases two adapters have in common.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from .tolerances import TOLERANCE_VERSION, compare, cross_tolerance

__all__ = ["adapter_report", "load_results", "cross_report", "full_report"]

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
}


def _fmt(x: float) -> str:
    return "inf" if x == float("inf") else f"{x:.2e}" if x else "0"


def _table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _case_dtype(case_id: str) -> str:
    return case_id.rsplit("-", 2)[-2]


def adapter_report(summary: dict) -> str:
    """One adapter's results: counts, then the worst error of each check per dtype next to its tolerance."""
    counts = summary["counts"]
    versions = ", ".join(f"{k} {v}" for k, v in summary["versions"].items()) or "versions unknown"
    lines = [
        f"## {summary['adapter']} ({versions})",
        "",
        f"devices: {', '.join(summary['devices']) or 'none'}; dtypes: {', '.join(summary['dtypes'])}; "
        f"tolerance table v{summary['tolerance_version']}; {summary['platform']}",
        "",
        "cases: "
        + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("passed", "failed", "error", "xfail", "xpass", "not-run")),
        "",
    ]
    worst: Dict[Tuple[str, str], dict] = {}
    for case in summary["cases"]:
        dtype = _case_dtype(case["id"])
        for name, check in case["checks"].items():
            entry = worst.setdefault((name, dtype), {"n": 0, "passed": 0, "check": check, "id": case["id"]})
            entry["n"] += 1
            entry["passed"] += bool(check["passed"])
            if check["ratio"] > entry["check"]["ratio"]:
                entry["check"], entry["id"] = check, case["id"]
    rows = []
    for (name, dtype), entry in worst.items():
        check = entry["check"]
        rows.append(
            [
                name,
                dtype,
                check["quantity"],
                f"{entry['passed']}/{entry['n']}",
                _fmt(check["max_abs"]),
                _fmt(check["max_rel"]),
                f"rtol {check['rtol']:g}, atol {check['atol']:g}",
                _fmt(check["ratio"]),
                entry["id"] if check["ratio"] > 0 else "",
            ]
        )
    if rows:
        lines.append(
            _table(
                [
                    "check",
                    "dtype",
                    "quantity",
                    "passed",
                    "worst abs err",
                    "worst rel err",
                    "tolerance",
                    "err/allowed",
                    "worst case",
                ],
                rows,
            )
        )
    problems = [case for case in summary["cases"] if case["status"] in ("failed", "error", "xpass")]
    if problems:
        lines += ["", "### Failures", ""]
        for case in problems:
            detail = [f"{n}: {c['detail']}" for n, c in case["checks"].items() if not c["passed"]]
            lines.append(f"- `{case['id']}` {case['status']}: " + ("; ".join(detail) or case["reason"].splitlines()[0]))
    xfails = [case for case in summary["cases"] if case["status"] == "xfail"]
    if xfails:
        lines += ["", f"### Expected failures ({len(xfails)})", ""]
        reasons: Dict[str, List[str]] = {}
        for case in xfails:
            reasons.setdefault(case["reason"], []).append(case["id"])
        lines += [f"- {len(ids)} cases (e.g. `{ids[0]}`): {reason}" for reason, ids in reasons.items()]
    not_run = [case for case in summary["cases"] if case["status"] == "not-run"]
    if not_run:
        lines += ["", f"### Not run ({len(not_run)})", "", f"- {not_run[0]['reason']} (e.g. `{not_run[0]['id']}`)"]
    return "\n".join(lines) + "\n"


def load_results(results_dir: Path) -> Dict[str, Tuple[dict, Dict[str, np.ndarray]]]:
    """Every saved adapter run under ``results_dir``: name -> (summary, arrays)."""
    runs = {}
    for summary_path in sorted(Path(results_dir).glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        with np.load(summary_path.parent / "arrays.npz") as arrays:
            runs[summary["adapter"]] = (summary, dict(arrays))
    return runs


def cross_report(results_dir: Path) -> Tuple[str, bool]:
    """Compare every pair of saved adapter runs on the cases they share; returns (markdown, all agree).

    Two backends may each be one tolerance away from the reference in opposite directions, so pairs
    are compared with :func:`~xnorm.conformance.tolerances.cross_tolerance`. Only cases that passed
    in both runs are compared (a failure is already reported in its own run).
    """
    runs = load_results(results_dir)
    lines = ["## Cross-backend agreement", ""]
    if len(runs) < 2:
        lines.append(
            f"Only {len(runs)} adapter run(s) saved under `{results_dir}` ({', '.join(runs) or 'none'}): "
            "nothing to compare pairwise. Run the conformance session of another backend first."
        )
        return "\n".join(lines) + "\n", True
    all_agree = True
    rows = []
    for (name_a, (sum_a, arr_a)), (name_b, (sum_b, arr_b)) in itertools.combinations(runs.items(), 2):
        passed_a = {c["id"] for c in sum_a["cases"] if c["status"] == "passed"}
        passed_b = {c["id"] for c in sum_b["cases"] if c["status"] == "passed"}
        shared = sorted(passed_a & passed_b)
        worst: Dict[Tuple[str, str], dict] = {}
        for case_id in shared:
            dtype = _case_dtype(case_id)
            for array_name, quantity in ARRAY_QUANTITY.items():
                key = f"{case_id}::{array_name}"
                if key not in arr_a or key not in arr_b:
                    continue
                rtol, atol = cross_tolerance(dtype, quantity)
                result = (
                    compare(arr_a[key], arr_b[key], rtol, atol)
                    if arr_a[key].shape == arr_b[key].shape
                    else {"max_abs": float("inf"), "ratio": float("inf"), "passed": False}
                )
                entry = worst.setdefault(
                    (quantity, dtype), {"n": 0, "bad": 0, "ratio": 0.0, "abs": 0.0, "id": "", "tol": (rtol, atol)}
                )
                entry["n"] += 1
                entry["bad"] += not result["passed"]
                if result["ratio"] >= entry["ratio"]:
                    entry.update(ratio=result["ratio"], abs=result["max_abs"], id=key)
        if not shared:
            rows.append([f"{name_a} vs {name_b}", "-", "-", "0", "-", "-", "-", "no case passed in both"])
        for (quantity, dtype), entry in sorted(worst.items()):
            all_agree &= entry["bad"] == 0
            rows.append(
                [
                    f"{name_a} vs {name_b}",
                    quantity,
                    dtype,
                    f"{entry['n'] - entry['bad']}/{entry['n']}",
                    _fmt(entry["abs"]),
                    f"rtol {entry['tol'][0]:g}, atol {entry['tol'][1]:g}",
                    _fmt(entry["ratio"]),
                    entry["id"] if entry["ratio"] > 0 else "",
                ]
            )
    lines.append(
        _table(["pair", "quantity", "dtype", "agree", "worst abs diff", "tolerance", "diff/allowed", "worst"], rows)
    )
    return "\n".join(lines) + "\n", all_agree


def full_report(results_dir: Path) -> Tuple[str, bool]:
    """Every saved adapter report followed by the cross-backend table; returns (markdown, all ok)."""
    runs = load_results(results_dir)
    parts = [f"# xnorm conformance report (tolerance table v{TOLERANCE_VERSION})", ""]
    ok = True
    for summary, _ in runs.values():
        parts.append(adapter_report(summary))
        ok &= all(case["status"] in ("passed", "xfail", "not-run") for case in summary["cases"])
    cross, agree = cross_report(results_dir)
    parts.append(cross)
    return "\n".join(parts), ok and agree and bool(runs)
