"""The report's picture: worst error/allowed per adapter and check, and the pairwise agreement.

Two heatmaps in one PNG, on one colour scale of ``log10(error / allowed)``: at or below 0 is within
tolerance (the suite's pass line), above is out. Cells that never ran are blank grey and say "not run";
a check that only failed by raising says "raised". matplotlib is optional (``xnorm[report]``); without
it the picture is not made and the report says why.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional

from .runner import CHECKS, FAILED, PASSED

__all__ = ["check_matrix", "pair_matrix", "report_figure"]


def check_matrix(runs: Dict) -> Dict[str, Dict[str, Optional[float]]]:
    """adapter -> check -> worst error/allowed over the checks that ran and were not expected to fail
    (``None``: none ran)."""
    out: Dict[str, Dict[str, Optional[float]]] = {}
    for name, run in runs.items():
        row: Dict[str, Optional[float]] = dict.fromkeys(CHECKS)
        for case in run.summary["cases"]:
            for check_name, check in case["checks"].items():
                if check["state"] in (PASSED, FAILED) and check["ratio"] is not None:
                    row[check_name] = max(row.get(check_name) or 0.0, check["ratio"])
        out[name] = row
    return out


def pair_matrix(names: List[str], pairs) -> List[List[Optional[float]]]:
    """Symmetric adapter x adapter matrix of the worst diff/allowed (``None`` on the diagonal and for a
    pair with no case in common)."""
    index = {name: i for i, name in enumerate(names)}
    matrix: List[List[Optional[float]]] = [[None] * len(names) for _ in names]
    for pair in pairs:
        worst = pair.worst
        value = worst["ratio"] if (pair.cases and worst) else None
        i, j = index[pair.a], index[pair.b]
        matrix[i][j] = matrix[j][i] = value
    return matrix


def _log(value: Optional[float]) -> float:
    if value is None:
        return math.nan
    if value == 0:
        return -6.0
    return max(-6.0, min(3.0, math.log10(value))) if math.isfinite(value) else 3.0


def _label(value: Optional[float], missing: str) -> str:
    if value is None:
        return missing
    if not math.isfinite(value):
        return "raised"
    return "0" if value == 0 else f"{value:.1g}"


def report_figure(runs: Dict, pairs, path: Path) -> str:
    """Draw the picture to ``path``; returns the path, or why it was not drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import TwoSlopeNorm
    except ImportError:
        return 'not made: matplotlib is not installed (pip install "xnorm[report]")'
    names = list(runs)
    if not names:
        return "not made: no saved run"
    checks = check_matrix(runs)
    pair_values = pair_matrix(names, pairs)
    norm = TwoSlopeNorm(vmin=-6.0, vcenter=0.0, vmax=3.0)
    cmap = matplotlib.colormaps["RdYlGn_r"].with_extremes(bad="#d0d0d0")
    rows = 0.45 * len(names)
    fig, (left, right) = plt.subplots(
        2, 1, figsize=(3 + 0.9 * max(len(CHECKS), len(names)), 3.5 + 2 * rows),
        gridspec_kw={"height_ratios": [1, 1]}, layout="constrained",
    )
    grid = [[_log(checks[name][check]) for check in CHECKS] for name in names]
    image = left.imshow(grid, cmap=cmap, norm=norm, aspect="auto")
    left.set_xticks(range(len(CHECKS)), CHECKS, rotation=40, ha="right")
    left.set_yticks(range(len(names)), names)
    left.set_title("worst error / allowed vs the float64 reference")
    for i, name in enumerate(names):
        for j, check in enumerate(CHECKS):
            left.text(j, i, _label(checks[name][check], "not run"), ha="center", va="center", fontsize=7)
    right.imshow([[_log(v) for v in row] for row in pair_values], cmap=cmap, norm=norm, aspect="auto")
    right.set_xticks(range(len(names)), names, rotation=40, ha="right")
    right.set_yticks(range(len(names)), names)
    right.set_title("worst diff / allowed between adapters")
    for i in range(len(names)):
        for j in range(len(names)):
            if i != j:
                right.text(j, i, _label(pair_values[i][j], "none"), ha="center", va="center", fontsize=7)
    bar = fig.colorbar(image, ax=[left, right], shrink=0.6)
    bar.set_label("log10(error / allowed); > 0 fails")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
