"""Benchmarks of the torch backend (issue 6): training step and inference, xnorm against plain and native.

    python benchmarks/bench_torch.py [--repeats N] [--sizes a,b] [--quick] [--results-dir DIR]

writes ``<results-dir>/torch.json`` (default ``benchmarks/results/``; rows as described in
``benchmarks/harness.py``) and prints the median ratios. Every variant of one ``(group, size, task)``
is timed in one :func:`harness.interleave` call, so each ratio compares timings of the same minute.

Variants, all starting from the same weights, ``dim=0`` everywhere (torch's layout, the output
channels, which is also the default of torch's own weight norms):

``train`` (forward, ``mean(y**2)``, backward, ``torch.optim.SGD`` step; eager mode, as torch users
train by default)
    ``plain``, ``xnorm``, ``xnorm-fused``, ``xnorm-auto`` (``fused="auto"``: fused at Linear 1024 only),
    ``native:parametrizations`` (``torch.nn.utils.parametrizations.weight_norm``), ``native:legacy``
    (``torch.nn.utils.weight_norm``).
``inference`` (``eval()`` and ``torch.no_grad()``)
    the same plus ``native:parametrizations-cached`` (each forward inside
    ``torch.nn.utils.parametrize.cached()``) and ``removed`` (``xnorm.remove`` of a wrapped copy).

``train`` compiled (group ``<group>/compiled``, sizes ``--compiled-sizes``)
    ``plain``, ``xnorm``, ``xnorm-fused``, each module passed through ``torch.compile`` (inductor, the
    default backend) as a torch user compiles a model; backward and SGD as in eager. Compiling happens
    in the warm-up calls, outside the timing.
``train`` of spectral norm (group ``<group>/spectral``, sizes ``--spectral-sizes``)
    ``plain``, ``xnorm`` (``xnorm.spectral_norm(layer)``), ``native:parametrizations``
    (``torch.nn.utils.parametrizations.spectral_norm``) and ``native:legacy``
    (``torch.nn.utils.spectral_norm``), one power iteration per step, every variant's default dim.
``train`` of the orthogonal parametrization (groups ``<group>/orth-<map>``, sizes ``harness.ORTHOGONAL_SIZES``)
    ``plain``, ``xnorm`` (``xnorm.orthogonal(layer, map)``), ``native:parametrizations``
    (``torch.nn.utils.parametrizations.orthogonal``), for each map.

Group ``cpu``, and ``cuda`` when ``torch.cuda.is_available()`` (timed with ``torch.cuda.synchronize``).
The default repeats keep a whole run near 5 minutes on a quiet 2-core machine; the Conv1d (vocoder)
size dominates it (about 60 GFLOP per forward), with one call per repetition.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal as parametrizations_orthogonal
from torch.nn.utils.parametrizations import spectral_norm as parametrizations_spectral_norm
from torch.nn.utils.parametrizations import weight_norm as parametrizations_weight_norm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402 - a sibling file, not a package

import xnorm  # noqa: E402

#: size -> (layer factory, input shape); shapes in torch's layout, as in harness.SIZES.
LAYERS: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...]]] = {
    "linear-64": (lambda: nn.Linear(64, 64), (8, 64)),
    "linear-1024": (lambda: nn.Linear(1024, 1024), (64, 1024)),
    "conv1d-512-k7": (lambda: nn.Conv1d(512, 512, 7, padding=3), (8, 512, 4096)),
    "conv2d-64-3x3": (lambda: nn.Conv2d(64, 64, 3, padding=1), (16, 64, 64, 64)),
}
assert set(LAYERS) == set(harness.SIZES), "bench_torch.LAYERS must cover harness.SIZES"

#: Default repetitions per size: cheap sizes afford many, the vocoder Conv1d (seconds per step) few.
DEFAULT_REPEATS = {"linear-64": 21, "linear-1024": 21, "conv1d-512-k7": 5, "conv2d-64-3x3": 11}
#: Warm-up calls per variant before timing (the first calls allocate and pick kernels).
DEFAULT_WARMUP = {"linear-64": 3, "linear-1024": 3, "conv1d-512-k7": 1, "conv2d-64-3x3": 2}

LEARNING_RATE = 1e-4  # small: thousands of steps must not drive the weights to zero or infinity
TRAIN_VARIANTS = ("plain", "xnorm", "xnorm-fused", "xnorm-auto", "native:parametrizations", "native:legacy")
INFERENCE_VARIANTS = (
    "plain",
    "xnorm",
    "xnorm-fused",
    "xnorm-auto",
    "native:parametrizations",
    "native:parametrizations-cached",
    "native:legacy",
    "removed",
)


def _legacy_weight_norm(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of parametrizations
        return torch.nn.utils.weight_norm(module, dim=0)


def build_variant(variant: str, plain: nn.Module) -> nn.Module:
    """A copy of ``plain`` with ``variant``'s weight norm (dim=0); every variant starts from its weights."""
    module = copy.deepcopy(plain)
    if variant == "plain":
        return module
    if variant == "xnorm":
        return xnorm.wrap(module, dim=0)
    if variant == "xnorm-fused":
        return xnorm.wrap(module, dim=0, fused=True)
    if variant == "xnorm-auto":
        return xnorm.wrap(module, dim=0, fused="auto")
    if variant in ("native:parametrizations", "native:parametrizations-cached"):
        return parametrizations_weight_norm(module, dim=0)
    if variant == "native:legacy":
        return _legacy_weight_norm(module)
    if variant == "removed":
        return xnorm.remove(xnorm.wrap(module, dim=0))
    raise ValueError(f"unknown variant {variant!r}")


def _legacy_spectral_norm(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.utils.spectral_norm(module)


#: spectral norm's variants: name -> what it does to a copy of the plain layer
SPECTRAL_VARIANTS: Dict[str, Callable[[nn.Module], nn.Module]] = {
    "plain": lambda module: module,
    "xnorm": lambda module: xnorm.spectral_norm(module),
    "native:parametrizations": lambda module: parametrizations_spectral_norm(module),
    "native:legacy": _legacy_spectral_norm,
}


def spectral_candidates(size: str, device: str) -> Dict[str, Callable[[], None]]:
    """Training steps of ``size``'s layer, plain and with each spectral norm; every variant copies one plain
    layer. The power-iteration vectors are each implementation's own random draw: one iteration's cost does
    not depend on them."""
    plain, x = _plain_layer_and_input(size, device)
    return {variant: train_step(make(copy.deepcopy(plain)), x) for variant, make in SPECTRAL_VARIANTS.items()}


COMPILED_VARIANTS = ("plain", "xnorm", "xnorm-fused")


def compiled_candidates(size: str, device: str) -> Dict[str, Callable[[], None]]:
    """Training steps of ``torch.compile`` of each variant (plain, xnorm, xnorm fused) of ``size``'s layer."""
    plain, x = _plain_layer_and_input(size, device)
    torch._dynamo.reset()  # each size compiles its own graphs; earlier sizes' guards would only slow lookups
    return {variant: train_step(build_variant(variant, plain), x, compile=True) for variant in COMPILED_VARIANTS}


def _plain_layer_and_input(size: str, device: str) -> Tuple[nn.Module, torch.Tensor]:
    factory, input_shape = LAYERS[size]
    torch.manual_seed(0)
    plain = factory().to(device)
    return plain, torch.randn(input_shape, generator=torch.Generator().manual_seed(1)).to(device)


def orthogonal_candidates(features: int, orthogonal_map: str, device: str) -> Dict[str, Callable[[], None]]:
    """Training steps of a square Linear: plain, xnorm's and torch's own orthogonal (both register the same
    square weight, which draws nothing: they start from the same base)."""
    torch.manual_seed(0)
    plain = nn.Linear(features, features).to(device)
    x = torch.randn((64, features), generator=torch.Generator().manual_seed(1)).to(device)
    modules = {
        "plain": copy.deepcopy(plain),
        "xnorm": xnorm.orthogonal(copy.deepcopy(plain), orthogonal_map),
        "native:parametrizations": parametrizations_orthogonal(copy.deepcopy(plain), orthogonal_map=orthogonal_map),
    }
    return {variant: train_step(module, x) for variant, module in modules.items()}


def train_step(module: nn.Module, x: torch.Tensor, *, compile: bool = False) -> Callable[[], None]:
    optimizer = torch.optim.SGD(module.parameters(), lr=LEARNING_RATE)
    module.train()
    forward = torch.compile(module) if compile else module

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward(x).square().mean().backward()
        optimizer.step()

    return step


def inference_call(module: nn.Module, x: torch.Tensor, *, cached: bool = False) -> Callable[[], None]:
    module.eval()

    def call() -> None:
        with torch.no_grad():
            if cached:
                with parametrize.cached():
                    module(x)
            else:
                module(x)

    return call


def run_size(
    group: str, size: str, device: str, repeats: int, warmup: int, min_rep_seconds: float, sync
) -> List[harness.Measurement]:
    plain, x = _plain_layer_and_input(size, device)
    rows = []
    for task, variants in (("train", TRAIN_VARIANTS), ("inference", INFERENCE_VARIANTS)):
        candidates = {}
        for variant in variants:
            module = build_variant(variant, plain)
            if task == "train":
                candidates[variant] = train_step(module, x)
            else:
                candidates[variant] = inference_call(module, x, cached=variant.endswith("-cached"))
        times = harness.interleave(
            candidates, repeats=repeats, warmup=warmup, min_rep_seconds=min_rep_seconds, sync=sync
        )
        note = f"eager; dim=0; SGD lr={LEARNING_RATE:g}; loss mean(y**2)" if task == "train" else "eval, no_grad"
        for variant in variants:
            extra_note = note + ("; parametrize.cached() around each forward" if variant.endswith("-cached") else "")
            rows.append(harness.Measurement(group, size, task, variant, times[variant], note=extra_note))
    return rows


def ratio(rows: List[harness.Measurement], variant: str, baseline: str) -> Optional[float]:
    """Median over repetitions of the per-repetition ratio ``variant / baseline`` (rows of one interleave)."""
    by_variant = {row.variant: row.per_call_ms for row in rows}
    if variant not in by_variant or baseline not in by_variant:
        return None
    return statistics.median(a / b for a, b in zip(by_variant[variant], by_variant[baseline], strict=True))


def best_xnorm_ratio(rows: List[harness.Measurement], baseline: str) -> Tuple[Optional[float], str]:
    """The best of ``xnorm``, ``xnorm-fused`` and ``xnorm-auto`` against ``baseline``, and which one it was."""
    found = [(ratio(rows, mode, baseline), mode) for mode in ("xnorm", "xnorm-fused", "xnorm-auto")]
    found = [(r, mode) for r, mode in found if r is not None]
    return min(found) if found else (None, "")


def print_table(rows: List[harness.Measurement]) -> None:
    order = list(LAYERS)
    rows = [row for row in rows if not harness.is_reparametrization_group(row.group)]
    keys = sorted({(row.group, row.size, row.task) for row in rows}, key=lambda k: (k[0], order.index(k[1]), k[2]))
    print("\nmedian per-repetition ratios (lower is faster); plain ms = median time per call of the plain layer")
    header = (
        f"{'group':<14} {'size':<14} {'task':<10} {'plain ms':>9} {'xnorm':>7} {'fused':>7} {'auto':>7} "
        f"{'native':>7} {'legacy':>7} {'cached':>7} {'removed':>7} {'best/native':>12}"
    )
    print(header)
    print("-" * len(header))
    for group, size, task in keys:
        these = [row for row in rows if (row.group, row.size, row.task) == (group, size, task)]
        plain_ms = next(row.median_ms for row in these if row.variant == "plain")

        def cell(variant, these=these):
            value = ratio(these, variant, "plain")
            return f"{value:7.3f}" if value is not None else f"{'-':>7}"

        best, mode = best_xnorm_ratio(these, "native:parametrizations")
        best_text = f"{best:.3f} ({mode.replace('xnorm-', '')})" if best is not None else "-"
        print(
            f"{group:<14} {size:<14} {task:<10} {plain_ms:9.3f} {cell('xnorm')} {cell('xnorm-fused')} "
            f"{cell('xnorm-auto')} "
            f"{cell('native:parametrizations')} {cell('native:legacy')} {cell('native:parametrizations-cached')} "
            f"{cell('removed')} {best_text:>12}"
        )
    print("columns xnorm..removed: variant / plain; native = parametrizations.weight_norm, legacy = weight_norm")


def main(argv: Optional[List[str]] = None) -> int:
    args, sizes = harness.parse_args(
        __doc__.split("\n\n")[0], argv, quick_help="a smoke test: 2 repetitions, tiny warm-up", compiled=True
    )

    groups = [("cpu", "cpu", None)]
    if torch.cuda.is_available():
        groups.append(("cuda", "cuda", torch.cuda.synchronize))

    rows: List[harness.Measurement] = []
    started = time.perf_counter()
    for group, device, sync in groups:
        for size in sizes:
            if args.quick:
                repeats, warmup, min_rep_seconds = args.repeats or 2, 1, 0.0
            else:
                repeats, warmup, min_rep_seconds = args.repeats or DEFAULT_REPEATS[size], DEFAULT_WARMUP[size], 0.1
            size_start = time.perf_counter()
            rows += run_size(group, size, device, repeats, warmup, min_rep_seconds, sync)
            print(f"{group} {size}: {time.perf_counter() - size_start:.1f} s", file=sys.stderr)
        train_note = f"eager; SGD lr={LEARNING_RATE:g}; loss mean(y**2)"
        rows += harness.spectral_rows(args, group, lambda size, device=device: spectral_candidates(size, device),
                                      DEFAULT_REPEATS, DEFAULT_WARMUP, train_note, sync)
        for size in args.compiled_sizes:
            size_start = time.perf_counter()
            candidates = compiled_candidates(size, device)
            if args.quick:
                repeats, warmup, min_rep_seconds = args.repeats or 2, 2, 0.0
            else:
                # two warm-up calls at least: the first compiles, the second runs the compiled graphs once
                repeats, min_rep_seconds = args.repeats or DEFAULT_REPEATS[size], 0.1
                warmup = max(2, DEFAULT_WARMUP[size])
            times = harness.interleave(candidates, repeats=repeats, warmup=warmup, min_rep_seconds=min_rep_seconds,
                                       sync=sync)
            rows += [harness.Measurement(f"{group}/compiled", size, "train", variant, times[variant],
                                         note=f"torch.compile (inductor) of the module; {train_note}")
                     for variant in candidates]
            print(f"{group} compiled {size}: {time.perf_counter() - size_start:.1f} s", file=sys.stderr)
        rows += harness.orthogonal_rows(
            args, group, lambda features, orthogonal_map, device=device: orthogonal_candidates(
                features, orthogonal_map, device), train_note, sync)

    machine = harness.machine_info(
        torch=torch.__version__,
        torch_threads=str(torch.get_num_threads()),
        cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else "",
        quick=str(args.quick),
    )
    path = harness.save("torch", rows, machine, args.results_dir)
    print_table(rows)
    harness.print_native_table(rows)
    print(f"\n{len(rows)} rows in {time.perf_counter() - started:.0f} s, saved to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
