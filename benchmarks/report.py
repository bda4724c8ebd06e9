"""Turn the per-backend timing files into ratio tables (markdown, JSON) and a plot (PNG).

    python benchmarks/report.py [--results-dir benchmarks/results] [--docs docs/performance.md]

Every ratio is computed per repetition between rows of the same ``(group, size, task)`` (their
repetitions were interleaved, see harness.py) and summarised by its median and interquartile range:

* wrapped/plain: each variant against ``plain`` (training step, forward, inference, compile);
* xnorm/native: xnorm's best mode (the faster of ``xnorm`` and ``xnorm-fused`` by median) against each
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

from harness import ORTHOGONAL_SIZES, RESULTS_DIR, SIZES  # noqa: E402

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
XNORM_VARIANTS = ("xnorm", "xnorm-fused")


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


def plot(all_ratios: List[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (nox -s bench installs it)", file=sys.stderr)
        return False
    rows = [r for r in all_ratios if r["task"] in ("train", "inference", "forward")]
    if not rows:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(14, max(4, 0.22 * len(rows))), squeeze=False)
    for ax, kind in zip(axes[0], ("wrapped/plain", "xnorm/native"), strict=True):
        chosen = [r for r in rows if r["kind"] == kind]
        labels = [f"{r['backend']} {r['group']} {r['size']} {r['task']} {r['variant']}" for r in chosen]
        medians = [r["median"] for r in chosen]
        errors = [[r["median"] - r["q1"] for r in chosen], [r["q3"] - r["median"] for r in chosen]]
        ax.barh(range(len(chosen)), medians, xerr=errors, color="tab:blue", alpha=0.7)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(chosen)), labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_title(f"{kind} (median, IQR); 1.0 = same speed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
    plotted = plot(all_ratios, args.results_dir / "ratios.png")
    print(text)
    if args.docs:
        doc = args.docs.read_text()
        if START not in doc or END not in doc:
            print(f"{args.docs} has no {START} ... {END} section to replace", file=sys.stderr)
            return 2
        head, _, rest = doc.partition(START)
        _, _, tail = rest.partition(END)
        args.docs.write_text(f"{head}{START}\n{text}\n{END}{tail}")
    print(f"(written: {args.results_dir / 'report.md'}, report.json{', ratios.png' if plotted else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
