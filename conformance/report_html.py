"""The combined report as one HTML page: the verdict, the picture, then per adapter every case with
every check's state and reason, linked to its saved arrays (``<adapter>/arrays.npz``, key
``<case id>::<array>``). It is written from the same data as ``report.md``; no template engine, so
that the report needs nothing beyond the standard library.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Dict, List

from .report import (
    STATE_WORDS,
    PairResult,
    Run,
    _fmt,
    _grouped_reasons,
    _ratio_text,
    check_rows,
    reparametrization_columns,
    reparametrization_counts,
)
from .runner import CHECKS, FAILED, NOT_RUN, PASSED, STATES, XFAIL

__all__ = ["html_report", "case_anchor"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; max-width: 110em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; vertical-align: top; }
.passed { background: #d9f2d9; } .failed { background: #f8c9c9; font-weight: bold; }
.xfail { background: #fde9b5; } .not-run { background: #e4e4e4; color: #555; }
.verdict-PASSED { color: #17701d; } .verdict-FAILED { color: #b00; } .verdict-INCOMPLETE { color: #8a6100; }
details { margin: 0.2em 0; } code { font-size: 0.95em; }
"""


def case_anchor(adapter: str, case_id: str) -> str:
    """The fragment id of one case of one adapter in the page."""
    return f"{adapter}--{case_id}"


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _table(header: List[str], rows: List[List[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    # A cell is HTML already: a ready <td ...> (state colour, anchor) or the content of a plain one.
    body = "".join(
        "<tr>" + "".join(cell if cell.startswith("<td") else f"<td>{cell}</td>" for cell in row) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _state_cell(state: str, text: str, title: str = "") -> str:
    return f'<td class="{_e(state)}" title="{_e(title)}">{_e(text)}</td>'


def _verdict(runs: Dict[str, Run], pairs: List[PairResult], word: str) -> str:
    reparams = reparametrization_columns(runs)
    rows = []
    for run in runs.values():
        counts = reparametrization_counts(run.summary)
        cells = [f'<a href="#{_e(run.name)}">{_e(run.name)}</a>']
        for reparam in reparams:
            c = counts.get(reparam)
            if not c:
                cells.append("-")
                continue
            state = next((s for s in (FAILED, XFAIL, PASSED) if c[s]), NOT_RUN)
            cells.append(_state_cell(state, " · ".join(f"{c[s]} {STATE_WORDS[s]}" for s in STATES if c[s])))
        rows.append(cells)
    pair_rows = []
    for pair in pairs:
        if not pair.cases:  # nothing compared; the markdown verdict counts these pairs in one line
            continue
        worst = pair.worst
        state = PASSED if pair.agree else FAILED
        pair_rows.append(
            [
                f"{_e(pair.a)} vs {_e(pair.b)}",
                str(pair.cases),
                _state_cell(state, "yes" if pair.agree else "no"),
                _e(_fmt(worst["ratio"]) if worst else "-"),
                _array_link(runs[pair.a], worst["key"]) if worst and worst["ratio"] else "",
            ]
        )
    out = [f'<h2 class="verdict-{_e(word)}">Verdict: {_e(word)}</h2>', _table(["adapter", *reparams], rows)]
    if pair_rows:
        out.append(_table(["pair", "cases compared", "all agree", "worst diff/allowed", "worst"], pair_rows))
    return "\n".join(out)


def _array_link(run: Run, key: str) -> str:
    case_id, _, array = key.partition("::")
    return f'<a href="#{_e(case_anchor(run.name, case_id))}">{_e(case_id)}</a> <code>{_e(array)}</code>'


#: a check the case's reparametrization does not have (spectral norm has no "preserves")
_ABSENT = {"state": "absent", "ratio": None, "detail": "this reparametrization has no such check"}


def _adapter_section(run: Run, results_dir: Path) -> str:
    summary = run.summary
    versions = ", ".join(f"{k} {v}" for k, v in summary["versions"].items())
    counts = summary["counts"]
    out = [
        f'<h2 id="{_e(run.name)}">{_e(run.name)} <small>({_e(versions)})</small></h2>',
        "<p>" + ", ".join(f"{counts.get(s, 0)} {STATE_WORDS[s]}" for s in STATES) + " cases; "
        f"dtypes run: {_e(', '.join(summary['dtypes']))}; devices: {_e(', '.join(summary['devices']))}</p>",
    ]
    if summary.get("log"):
        out.append(f'<p>Framework output of this run: <a href="{_e(summary["log"])}">{_e(summary["log"])}</a></p>')
    rows = []
    for row in check_rows(summary):
        worst = row["worst"]
        rows.append(
            [
                _e(row["check"]),
                _e(row["dtype"]),
                *(_state_cell(s, str(row["counts"][s])) if row["counts"][s] else "0" for s in STATES),
                _e(_ratio_text(worst)),
                f'<a href="#{_e(case_anchor(run.name, row["worst_id"]))}">{_e(row["worst_id"])}</a>'
                if worst and worst["ratio"] else "",
            ]
        )
    out.append(_table(["check", "dtype", *(STATE_WORDS[s] for s in STATES), "worst err/allowed", "worst case"],
                      rows))
    npz = Path(summary.get("arrays", "arrays.npz"))
    link_base = f"{run.folder.name}/{npz.name}" if run.folder.parent == results_dir else str(run.folder / npz.name)
    for state, title in ((XFAIL, "Expected failures"), (NOT_RUN, "Not run")):
        reasons = _grouped_reasons(summary["cases"], state)
        if reasons:
            out.append(f"<h3>{title} ({sum(len(ids) for ids in reasons.values())} cases)</h3><ul>")
            out += [
                f'<li>{len(ids)} cases (e.g. <a href="#{_e(case_anchor(run.name, ids[0]))}">{_e(ids[0])}</a>): '
                f"{_e(reason)}</li>"
                for reason, ids in reasons.items()
            ]
            out.append("</ul>")
    case_rows = []
    for case in summary["cases"]:
        anchor = case_anchor(run.name, case["id"])
        keys = sorted(k.partition("::")[2] for k in run.arrays if k.startswith(case["id"] + "::"))
        arrays = ", ".join(f"<code>{_e(k)}</code> {_e(run.arrays[case['id'] + '::' + k].shape)}" for k in keys)
        reason = case["reason"]
        notes = []
        if reason:
            notes.append(f"<pre>{_e(reason)}</pre>")
        if arrays:
            notes.append(f'arrays in <a href="{_e(link_base)}">{_e(link_base)}</a> as <code>{_e(case["id"])}::'
                         f"&lt;name&gt;</code>: {arrays}")
        case_rows.append(
            [
                f'<td id="{_e(anchor)}"><code>{_e(case["id"])}</code></td>',
                _state_cell(case["status"], STATE_WORDS[case["status"]]),
                *(
                    _state_cell(
                        check["state"],
                        _ratio_text(check)
                        if check["state"] in (PASSED, FAILED)
                        else STATE_WORDS.get(check["state"], "-"),
                        check["detail"],
                    )
                    for check in (case["checks"].get(name, _ABSENT) for name in CHECKS)
                ),
                "<details><summary>reason, arrays</summary>" + "<br>".join(notes) + "</details>" if notes else "",
            ]
        )
    out.append(
        "<details><summary>every case (hover a cell for its detail; numbers are error/allowed)</summary>"
        + _table(["case", "state", *CHECKS, ""], case_rows)
        + "</details>"
    )
    return "\n".join(out)


def html_report(runs: Dict[str, Run], pairs: List[PairResult], word: str, picture: Path) -> str:
    """The page's text; ``picture`` is linked when it exists (relative to the page)."""
    results_dir = picture.parent
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>xnorm conformance report</title>",
        f"<style>{_STYLE}</style></head><body><h1>xnorm conformance report</h1>",
        _verdict(runs, pairs, word),
    ]
    if picture.exists():
        parts.append(f'<p><img src="{_e(picture.name)}" alt="worst error/allowed per adapter and check, and '
                     'per pair of adapters" style="max-width:100%"></p>')
    parts += [_adapter_section(run, results_dir) for run in runs.values()]
    detail_rows = []
    for pair in pairs:
        for row in pair.rows:
            detail_rows.append(
                [
                    f"{_e(pair.a)} vs {_e(pair.b)}",
                    _e(row["quantity"]),
                    _e(row["dtype"]),
                    _state_cell(PASSED if not row["bad"] else FAILED, f"{row['n'] - row['bad']}/{row['n']}"),
                    _e(_fmt(row["ratio"])),
                    _array_link(runs[pair.a], row["key"]) if row["ratio"] else "",
                ]
            )
    if detail_rows:
        parts += ["<h2>Cross-backend agreement (details)</h2>",
                  _table(["pair", "quantity", "dtype", "agree", "worst diff/allowed", "worst"], detail_rows)]
    parts.append("</body></html>")
    return "\n".join(parts)
