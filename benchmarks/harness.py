"""Side-by-side timing shared by every backend's benchmark (benchmarks/bench_<backend>.py).

Timings on a busy 2-core machine drift by tens of percent over a minute, so a ratio is only worth
something when both sides are timed in the same minute. :func:`interleave` runs the candidates of one
comparison round-robin (the order rotates every repetition), and the ratio is taken *per repetition*
before its median is reported: a slow phase of the machine hits both sides of one repetition alike.

Result files (one per backend, ``benchmarks/results/<backend>.json``) hold :class:`Measurement` rows::

    {"backend": "torch", "machine": {...}, "rows": [
        {"group": "cpu", "size": "linear-1024", "task": "train", "variant": "plain",
         "per_call_ms": [..one per repetition..], "note": "", "extra": {}},
        ...]}

Ratios are only taken between rows of the same ``(group, size, task)``, whose repetitions were
interleaved by one :func:`interleave` call. ``group`` names the mode and device (``"cpu"``,
``"graph/cpu"``, ``"nnx/cuda"``). Variant names:

* ``plain``: the layer without weight norm (the baseline of every wrapped/plain ratio);
* ``xnorm``, ``xnorm-fused``: ``xnorm.wrap(layer)`` and ``xnorm.wrap(layer, fused=True)``;
* ``native:<name>``: the framework's own alternative (``native:parametrizations``,
  ``native:parametrizations-cached``, ``native:legacy``, ``native:linen.WeightNorm``,
  ``native:nnx.WeightNorm``, ``native:assign-wrapper``);
* ``removed``: ``xnorm.remove`` applied to a wrapped layer (task ``inference``).

The orthogonal parametrization's rows (:data:`ORTHOGONAL_SIZES`) live in the groups
``<group>/orth-<map>``, where ``xnorm`` is ``xnorm.orthogonal(layer, map)`` and
``native:parametrizations`` torch's own ``parametrizations.orthogonal``. Spectral norm's rows (the
sizes of :data:`SIZES`, one power iteration per step, the frameworks' default) live in the groups
``<group>/spectral``, where ``xnorm`` is ``xnorm.spectral_norm(layer)`` and ``native:*`` the
framework's own spectral norm. torch's compiled rows live in ``<group>/compiled``: every variant is
the eager one passed through ``torch.compile`` (inductor).

``benchmarks/report.py`` turns them into the ratio tables, the JSON summary and the plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional

RESULTS_DIR = Path(__file__).parent / "results"

#: The sizes of issue 6, the same in every backend: name -> description (shapes in torch's layout).
SIZES = {
    "linear-64": "Linear 64->64, batch 8 (overhead dominates)",
    "linear-1024": "Linear 1024->1024, batch 64",
    "conv1d-512-k7": "Conv1d 512->512, k=7, batch 8 x 4096 samples (vocoder)",
    "conv2d-64-3x3": "Conv2d 64->64, 3x3, batch 16 x 64x64",
}

#: The sizes of torch's compiled rows by default (issue 15's targets: Linear 1024 and the convolutions; Linear 64
#: is overhead-bound, where compiling is not what a user would do first).
COMPILED_SIZES = ("linear-1024", "conv1d-512-k7", "conv2d-64-3x3")

#: The orthogonal parametrization's sizes (issue 12): a training step of a square Linear, timed per map in the
#: groups ``<group>/orth-<map>`` (variants ``plain``, ``xnorm``, ``native:parametrizations`` where the
#: framework has one), so that report.py's wrapped/plain and xnorm/native ratios apply unchanged.
ORTHOGONAL_SIZES = {
    "linear-256": "Linear 256->256, batch 64 (orthogonal)",
    "linear-1024": "Linear 1024->1024, batch 64 (orthogonal)",
}
ORTHOGONAL_MAPS = ("matrix_exp", "cayley", "householder")
#: Default repetitions and warm-up calls per orthogonal size. One call per repetition: interleave calibrates
#: the calls on the first candidate (plain, a fraction of a millisecond), and a householder step of torch at
#: 1024 takes seconds, so calibrated repetitions would last minutes.
ORTHOGONAL_REPEATS = {"linear-256": 15, "linear-1024": 5}
ORTHOGONAL_WARMUP = {"linear-256": 2, "linear-1024": 1}


def spectral_group(group: str) -> str:
    """The group of the spectral-norm rows timed in ``group``."""
    return f"{group}/spectral"


def orthogonal_group(group: str, orthogonal_map: str) -> str:
    """The group of the orthogonal rows of ``orthogonal_map`` timed in ``group``."""
    return f"{group}/orth-{orthogonal_map}"


def is_orthogonal_group(group: str) -> bool:
    return "/orth-" in group


def orthogonal_rows(args, group: str, candidates_for: Callable[[int, str], Mapping[str, Callable[[], object]]],
                    note: str, sync: Optional[Callable[[], None]] = None) -> List[Measurement]:
    """Time the orthogonal training steps of ``args.orthogonal_sizes`` (from :func:`parse_args`) in ``group``:
    ``candidates_for(features, map)`` returns the backend's ``{variant: step}`` for a square Linear of
    ``features``, all variants starting from the same weights; one :func:`interleave` per size and map."""
    rows = []
    for size in args.orthogonal_sizes:
        started = time.perf_counter()
        if args.quick:
            repeats, warmup = args.repeats or 2, 1
        else:
            repeats, warmup = args.repeats or ORTHOGONAL_REPEATS[size], ORTHOGONAL_WARMUP[size]
        for orthogonal_map in ORTHOGONAL_MAPS:
            candidates = candidates_for(int(size.split("-")[1]), orthogonal_map)
            times = interleave(candidates, repeats=repeats, warmup=warmup, min_rep_seconds=0.0, sync=sync)
            rows += [Measurement(orthogonal_group(group, orthogonal_map), size, "train", variant, times[variant],
                                 note=note) for variant in candidates]
        print(f"{group} orthogonal {size}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return rows


def spectral_rows(args, group: str, candidates_for: Callable[[str], Mapping[str, Callable[[], object]]],
                  repeats: Mapping[str, int], warmup: Mapping[str, int], note: str,
                  sync: Optional[Callable[[], None]] = None) -> List[Measurement]:
    """Time spectral norm's training steps at ``args.spectral_sizes`` in ``spectral_group(group)``:
    ``candidates_for(size)`` returns the backend's ``{variant: step}`` (``plain``, ``xnorm``, ``native:*``), all
    starting from the same weights; ``repeats``/``warmup`` are the backend's per-size defaults."""
    rows = []
    for size in args.spectral_sizes:
        started = time.perf_counter()
        if args.quick:
            size_repeats, size_warmup, min_rep_seconds = args.repeats or 2, 1, 0.0
        else:
            size_repeats, size_warmup, min_rep_seconds = args.repeats or repeats[size], warmup[size], 0.1
        candidates = candidates_for(size)
        times = interleave(candidates, repeats=size_repeats, warmup=size_warmup, min_rep_seconds=min_rep_seconds,
                           sync=sync)
        rows += [Measurement(spectral_group(group), size, "train", variant, times[variant], note=note)
                 for variant in candidates]
        print(f"{group} spectral {size}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return rows


def is_reparametrization_group(group: str) -> bool:
    """Rows of another reparametrization than weight norm (their own tables: :func:`print_native_table`)."""
    return is_orthogonal_group(group) or group.endswith("/spectral")


def print_native_table(rows: List[Measurement]) -> None:
    """Median per-repetition ratios of the orthogonal and spectral-norm rows: xnorm and each native against
    plain, xnorm against each native."""
    rows = [row for row in rows if is_reparametrization_group(row.group)]
    if not rows:
        return
    order = list(ORTHOGONAL_SIZES) + [size for size in SIZES if size not in ORTHOGONAL_SIZES]
    keys = sorted({(row.group, row.size) for row in rows},
                  key=lambda k: (k[0].rsplit("/", 1)[1], order.index(k[1]), k[0]))
    print("\nspectral norm and orthogonal training step: median per-repetition ratios (lower is faster)")
    header = f"{'group':<28} {'size':<14} {'plain ms':>9} {'xnorm':>8}  against each native: native/plain, xnorm/native"
    print(header)
    print("-" * len(header))
    for group, size in keys:
        times = {row.variant: row.per_call_ms for row in rows if (row.group, row.size) == (group, size)}

        def ratio(a: str, b: str, times=times) -> str:
            return f"{statistics.median(x / y for x, y in zip(times[a], times[b], strict=True)):.3f}"

        natives = "; ".join(f"{name}: {ratio(name, 'plain')}, {ratio('xnorm', name)}"
                            for name in times if name.startswith("native:"))
        print(f"{group:<28} {size:<14} {statistics.median(times['plain']):9.3f} {ratio('xnorm', 'plain'):>8}  "
              f"{natives or '(no native)'}")


#: Tasks a row can time.
TASKS = {
    "train": "one training step: forward, backward, optimizer update (SGD)",
    "forward": "one forward pass in training mode (used where backward is not meaningful)",
    "inference": "one forward pass in inference mode",
    "compile": "graph compile time of a small model (first call minus a warm call)",
    "convert": "checkpoint conversion of ~1 GB of float32 weights",
}


@dataclasses.dataclass
class Measurement:
    group: str
    size: str
    task: str
    variant: str
    per_call_ms: List[float]
    note: str = ""
    extra: Dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.per_call_ms)


def _time_calls(fn: Callable[[], object], calls: int, sync: Callable[[], None]) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1e3


def interleave(
    candidates: Mapping[str, Callable[[], object]],
    *,
    repeats: int = 15,
    warmup: int = 3,
    min_rep_seconds: float = 0.1,
    sync: Optional[Callable[[], None]] = None,
) -> Dict[str, List[float]]:
    """Time each candidate ``repeats`` times, round-robin, and return per-call milliseconds per repetition.

    Each callable runs one step and must leave the device idle or be paired with ``sync`` (e.g.
    ``torch.cuda.synchronize``, or a ``block_until_ready`` inside the callable) so the clock measures
    finished work. The number of calls per repetition is calibrated once on the first candidate so a
    repetition lasts about ``min_rep_seconds``; every candidate then makes the same number of calls.
    """
    sync = sync or (lambda: None)
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
        sync()
    first = candidates[names[0]]
    single_ms = _time_calls(first, 1, sync)
    calls = max(1, int(min_rep_seconds * 1e3 / max(single_ms, 1e-3)))
    times: Dict[str, List[float]] = {name: [] for name in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(_time_calls(candidates[name], calls, sync))
    return times


def machine_info(**extra: str) -> Dict[str, str]:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": str(os.cpu_count()),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info.update(extra)
    return info


def save(backend: str, rows: List[Measurement], machine: Mapping[str, str], results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``<results_dir>/<backend>.json``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{backend}.json"
    payload = {"backend": backend, "machine": dict(machine), "rows": [dataclasses.asdict(row) for row in rows]}
    path.write_text(json.dumps(payload, indent=1))
    return path


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _size_list(parser: argparse.ArgumentParser, option: str, text: str, known) -> List[str]:
    sizes = [size.strip() for size in text.split(",") if size.strip()]
    unknown = [size for size in sizes if size not in known]
    if unknown:
        parser.error(f"unknown {option} size(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return sizes


def parse_args(description: str, argv: Optional[List[str]], *, quick_help: str, sizes_help: str = "",
               compiled: bool = False, add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None):
    """The command line every backend's benchmark shares; returns ``(args, sizes)``, every size list checked
    against SIZES or ORTHOGONAL_SIZES. ``compiled`` adds ``--compiled-sizes`` (torch.compile rows);
    ``add_arguments`` adds a backend's own options."""
    parser = argparse.ArgumentParser(description=description)
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("--repeats", type=int, default=None, help="repetitions per variant (default: per size)")
    parser.add_argument(
        "--sizes", default=",".join(SIZES), help=f"comma-separated, from {', '.join(SIZES)}{sizes_help}"
    )
    parser.add_argument(
        "--orthogonal-sizes", default=",".join(ORTHOGONAL_SIZES),
        help=f"comma-separated orthogonal training-step sizes, from {', '.join(ORTHOGONAL_SIZES)}; '' for none",
    )
    parser.add_argument(
        "--spectral-sizes", default=",".join(SIZES),
        help="comma-separated spectral-norm training-step sizes, from the sizes above; '' for none",
    )
    if compiled:
        parser.add_argument(
            "--compiled-sizes", default=",".join(COMPILED_SIZES),
            help="comma-separated sizes of the torch.compile training-step rows, from the sizes above; '' for none",
        )
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    sizes = _size_list(parser, "--sizes", args.sizes, SIZES)
    args.orthogonal_sizes = _size_list(parser, "--orthogonal-sizes", args.orthogonal_sizes, ORTHOGONAL_SIZES)
    args.spectral_sizes = _size_list(parser, "--spectral-sizes", args.spectral_sizes, SIZES)
    args.compiled_sizes = _size_list(parser, "--compiled-sizes", args.compiled_sizes, SIZES) if compiled else []
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args, sizes
