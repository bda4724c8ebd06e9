"""Turn the per-backend timing files into ratio tables (markdown, JSON) and two plots (PNG), one per question:
``overhead.png`` (xnorm's training step against the plain layer) and ``native.png`` (against the framework's
own implementation), targets drawn.

    python benchmarks/report.py [--results-dir benchmarks/results] [--docs docs/performance.md]

Every ratio is computed per repetition between rows of the same ``(group, size, task)`` (their
repetitions were interleaved, see harness.py) and summarised by its median and interquartile range:

* wrapped/plain: each variant against ``plain`` (training step, forward, inference, compile);
* xnorm/native: xnorm's best mode (the fastest of ``xnorm``, ``xnorm-fused`` and ``xnorm-auto`` by median) against each
  ``native:*`` variant of the same task.

With ``--docs``, the part of that markdown file between ``<!-- bench:start -->`` and
``<!-- bench:end -->`` is replaced by the tables, so the docs always show the latest run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from harness import ORTHOGONAL_SIZES, RESULTS_DIR, SIZES, is_reparametrization_group  # noqa: E402

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
XNORM_VARIANTS = ("xnorm", "xnorm-fused", "xnorm-auto")


def _quartiles(values: List[float]):
    values = sorted(values)
    if len(values) < 4:
        return statistics.median(values), values[0], values[-1]
    q1, median, q3 = statistics.quantiles(values, n=4)
    return median, q1, q3


def _ratio(numerator: List[float], denominator: List[float]) -> Dict[str, float]:
    per_rep = [a / b for a, b in zip(numerator, denominator, strict=True) if b > 0]
    median, q1, q3 = _quartiles(per_rep)
    return {"median": median, "q1": q1, "q3": q3, "n": len(per_rep)}


def ratios(payload: dict) -> List[dict]:
    """Ratio rows of one backend's result file."""
    by_key: Dict[tuple, Dict[str, dict]] = {}
    for row in payload["rows"]:
        by_key.setdefault((row["group"], row["size"], row["task"]), {})[row["variant"]] = row
    out = []
    for (group, size, task), variants in by_key.items():
        plain = variants.get("plain")
        if plain is not None:
            for name, row in variants.items():
                if name != "plain":
                    out.append(
                        dict(
                            backend=payload["backend"],
                            group=group,
                            size=size,
                            task=task,
                            kind="wrapped/plain",
                            variant=name,
                            **_ratio(row["per_call_ms"], plain["per_call_ms"]),
                        )
                    )
        present = [v for v in XNORM_VARIANTS if v in variants]
        if present:
            best = min(present, key=lambda v: statistics.median(variants[v]["per_call_ms"]))
            for name, row in variants.items():
                if name.startswith("native:"):
                    out.append(
                        dict(
                            backend=payload["backend"],
                            group=group,
                            size=size,
                            task=task,
                            kind="xnorm/native",
                            variant=f"{best} vs {name}",
                            **_ratio(variants[best]["per_call_ms"], row["per_call_ms"]),
                        )
                    )
    return out


def _medians(payload: dict) -> List[dict]:
    return [
        dict(
            backend=payload["backend"],
            group=r["group"],
            size=r["size"],
            task=r["task"],
            variant=r["variant"],
            median_ms=statistics.median(r["per_call_ms"]),
            n=len(r["per_call_ms"]),
            note=r.get("note", ""),
            extra=r.get("extra", {}),
        )
        for r in payload["rows"]
    ]


def markdown(payloads: List[dict], all_ratios: List[dict]) -> str:
    lines = []
    for payload in payloads:
        machine = payload["machine"]
        lines += [f"### {payload['backend']}", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), ""]
        rows = [r for r in all_ratios if r["backend"] == payload["backend"]]
        if rows:
            lines += [
                "| group | size | task | ratio | variant | median | IQR | n |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in rows:
                lines.append(
                    f"| {r['group']} | {r['size']} | {r['task']} | {r['kind']} | {r['variant']} | "
                    f"**{r['median']:.3f}** | {r['q1']:.3f}–{r['q3']:.3f} | {r['n']} |"
                )
            lines.append("")
        lines += [
            "<details><summary>median times (ms)</summary>",
            "",
            "| group | size | task | variant | median ms | n | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in _medians(payload):
            extra = "; ".join(f"{k} {v:.4g}" for k, v in m["extra"].items())
            note = "; ".join(x for x in (m["note"], extra) if x)
            lines.append(
                f"| {m['group']} | {m['size']} | {m['task']} | {m['variant']} | {m['median_ms']:.3f} | "
                f"{m['n']} | {note} |"
            )
        lines += ["", "</details>", ""]
    lines += ["Sizes: " + "; ".join(f"`{k}` {v}" for k, v in SIZES.items()), ""]
    lines += ["Orthogonal sizes (groups `<group>/orth-<map>`): "
              + "; ".join(f"`{k}` {v}" for k, v in ORTHOGONAL_SIZES.items()), ""]
    return "\n".join(lines)


#: The targets the plots draw (issue 6 and issue 15), by question, then by group kind and size. A size
#: without an entry has no target of its own there (Linear 64 is overhead-bound; the orthogonal sizes are
#: compared with torch's own only).
TARGETS = {
    "wrapped/plain": {
        "eager": {"linear-1024": 1.10, "conv1d-512-k7": 1.03, "conv2d-64-3x3": 1.03},
        "compiled": {"linear-1024": 1.05, "conv1d-512-k7": 1.02, "conv2d-64-3x3": 1.02},
    },
    "xnorm/native": {
        "eager": {"linear-64": 1.00, "linear-1024": 0.90, "conv1d-512-k7": 1.00, "conv2d-64-3x3": 1.00},
        "reparametrization": {size: 1.00 for size in list(SIZES) + list(ORTHOGONAL_SIZES)},
    },
}
FIGURES = {
    "wrapped/plain": ("overhead.png", "training step, xnorm / plain layer (lower is faster)"),
    "xnorm/native": ("native.png", "training step, xnorm / the framework's own implementation (lower is faster; "
                     "f: xnorm's fused mode, a: fused='auto')"),
}


def _group_kind(group: str) -> str:
    if group.endswith("/compiled"):
        return "compiled"
    if is_reparametrization_group(group):
        return "reparametrization"
    return "eager"


def _plotted(all_ratios: List[dict], kind: str) -> List[dict]:
    """The training-step rows of one question: xnorm's modes only (not the natives against plain), weight
    norm's eager and compiled groups against plain, every group against its natives."""
    rows = [r for r in all_ratios if r["task"] == "train" and r["kind"] == kind]
    if kind == "wrapped/plain":
        rows = [r for r in rows if r["variant"] in XNORM_VARIANTS and _group_kind(r["group"]) != "reparametrization"]
    return rows


def _series(row: dict) -> str:
    """A bar's legend entry: the group and variant; against a native, the group and the native (xnorm's best
    mode differs by size: its bar is labelled "f" where that was the fused one, "a" fused="auto")."""
    if row["kind"] == "xnorm/native":
        return f"{row['group']}: xnorm's best vs {row['variant'].split(' vs ', 1)[1]}"
    return f"{row['group']}: {row['variant']}"


def plot(all_ratios: List[dict], results_dir: Path) -> List[Path]:
    """One figure per question (:data:`FIGURES`): a panel per backend, bars grouped by size (median, IQR as
    error bars), each target drawn as a dashed line over its size. Returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (nox -s bench installs it)", file=sys.stderr)
        return []
    written = []
    size_order = list(SIZES) + [size for size in ORTHOGONAL_SIZES if size not in SIZES]
    for kind, (name, title) in FIGURES.items():
        rows = _plotted(all_ratios, kind)
        backends = list(dict.fromkeys(r["backend"] for r in rows))
        if not backends:
            continue
        fig, axes = plt.subplots(len(backends), 1, figsize=(13, 4.2 * len(backends)), squeeze=False)
        for ax, backend in zip(axes[:, 0], backends, strict=True):
            mine = [r for r in rows if r["backend"] == backend]
            sizes = sorted({r["size"] for r in mine}, key=size_order.index)
            series = list(dict.fromkeys(_series(r) for r in mine))
            width = 0.8 / len(series)
            for index, label in enumerate(series):
                points = [(sizes.index(r["size"]), r) for r in mine if _series(r) == label]
                xs = [x - 0.4 + width * (index + 0.5) for x, _ in points]
                medians = [r["median"] for _, r in points]
                errors = [[r["median"] - r["q1"] for _, r in points], [r["q3"] - r["median"] for _, r in points]]
                ax.bar(xs, medians, width, yerr=errors, label=label, capsize=2)
                for x, (_, r) in zip(xs, points, strict=True):
                    mode = {"xnorm-fused": "f", "xnorm-auto": "a"}.get(r["variant"].split(" vs ")[0], "")
                    ax.annotate(f"{r['median']:.2f}{mode}", (x, r["median"]), fontsize=7, ha="center",
                                va="bottom", xytext=(0, 2), textcoords="offset points")
            for x, size in enumerate(sizes):
                targets = {TARGETS[kind].get(_group_kind(r["group"]), {}).get(size) for r in mine if r["size"] == size}
                for target in sorted(t for t in targets if t is not None):
                    ax.hlines(target, x - 0.45, x + 0.45, colors="red", linestyles="dashed", linewidth=1.2)
                    ax.annotate(f"target {target:.2f}", (x + 0.45, target), fontsize=8, color="red",
                                ha="right", va="bottom")
            ax.axhline(1.0, color="black", linewidth=0.6)
            # bars from a floor just under the lowest quartile: differences of a few percent stay visible
            ax.set_ylim(bottom=max(0.0, round(min(r["q1"] for r in mine) - 0.15, 1)))
            ax.set_xticks(range(len(sizes)), sizes)
            ax.set_ylabel("ratio")
            ax.set_title(f"{backend}: {title}")
            ax.legend(fontsize=7, ncol=2 if len(series) > 6 else 1, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        path = results_dir / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--docs", type=Path, help="markdown file whose bench section is replaced")
    args = parser.parse_args(argv)
    files = sorted(p for p in args.results_dir.glob("*.json") if p.name != "report.json")
    if not files:
        print(f"no results in {args.results_dir}; run a benchmark first (nox -s bench)", file=sys.stderr)
        return 2
    payloads = [json.loads(p.read_text()) for p in files]
    all_ratios = [r for payload in payloads for r in ratios(payload)]
    text = markdown(payloads, all_ratios)
    (args.results_dir / "report.md").write_text(text)
    (args.results_dir / "report.json").write_text(
        json.dumps({"ratios": all_ratios, "medians": [m for payload in payloads for m in _medians(payload)]}, indent=1)
    )
    plotted = plot(all_ratios, args.results_dir)
    print(text)
    if args.docs:
        doc = args.docs.read_text()
        if START not in doc or END not in doc:
            print(f"{args.docs} has no {START} ... {END} section to replace", file=sys.stderr)
            return 2
        head, _, rest = doc.partition(START)
        _, _, tail = rest.partition(END)
        args.docs.write_text(f"{head}{START}\n{text}\n{END}{tail}")
    print(f"(written: {args.results_dir / 'report.md'}, report.json{''.join(', ' + p.name for p in plotted)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
