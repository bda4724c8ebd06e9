"""Benchmarks of the MindSpore backend (issue 6), GRAPH_MODE: training step, forward, inference, compile time.

    python benchmarks/bench_mindspore.py [--repeats N] [--sizes a,b] [--quick] [--graph-kernel] [--results-dir DIR]

writes ``<results-dir>/mindspore.json`` (default ``benchmarks/results/``; rows as described in
``benchmarks/harness.py``) and prints the median ratios. Every variant of one ``(group, size, task)``
is timed in one :func:`harness.interleave` call (compile: one round-robin loop of the same kind), so
each ratio compares timings of the same minute.

Variants, all starting from the same weights, ``dim=0`` everywhere (torch's layout: the output
channels of Dense and Conv, one norm per output channel as in the counter-example below):

``train`` (forward, ``mean(y**2)``, backward, ``nn.SGD`` update, compiled as one ``mindspore.jit``
function of ``mindspore.value_and_grad`` and the optimizer, as the README and the conformance adapter
train; the MindSpore 2.x idiom, and the same graph a ``TrainOneStepCell`` compiles)
    ``plain``, ``xnorm``, ``xnorm-fused``.
``forward`` (the Cell called in GRAPH_MODE, training mode)
    ``plain``, ``xnorm``, ``xnorm-fused``, ``native:assign-wrapper``: the community Cell that
    ``ops.Assign``s ``g * v / ||v||`` into the inner layer's weight before calling it
    (:class:`AssignWeightNorm`). Its gradients miss g and v (see tests/mindspore/test_training.py),
    so it is timed forward only; MindSpore has no weight norm of its own.
``inference`` (``set_train(False)``)
    ``plain``, ``removed`` (``xnorm.remove`` of a wrapped copy), ``xnorm``, ``xnorm-fused``.
``train`` of spectral norm (group ``graph/<device>/spectral``, sizes ``--spectral-sizes``)
    ``plain`` and ``xnorm`` (``xnorm.spectral_norm(layer)``, one power iteration per step, u and v
    written back in the graph): MindSpore has no spectral norm of its own.
``train`` of the orthogonal parametrization (groups ``graph/<device>/orth-<map>``, ``harness.ORTHOGONAL_SIZES``)
    ``plain`` and ``xnorm`` (``xnorm.orthogonal(layer, map)``): MindSpore has no orthogonal parametrization.
``compile`` (size ``small-model``: 4 Conv1d + 2 Dense, every layer wrapped)
    ``plain``, ``xnorm``, ``xnorm-fused``: per repetition a fresh model and a fresh jit training
    step; the first call (compile + run) minus the second (run) is the compile time.

Group ``graph/<device>`` (``graph/cpu`` here). With ``--graph-kernel`` every graph is compiled with
MindSpore's graph kernel fusion (``enable_graph_kernel=True``: its bundled AKG compiler fuses elementwise
ops and reductions into generated kernels; on the CPU it needs the ``decorator`` package, which
MindSpore's wheel does not declare), groups ``graph-kernel/<device>``, saved as
``mindspore-graph-kernel.json``: the same variants, so its ratios say what fusion buys each of them.

The default repeats keep a whole run near 4 minutes on
a quiet 2-core machine; the Conv1d (vocoder) size dominates it (about 60 GFLOP per forward, 0.7 s
forward and 2 s per training step there), with one call per repetition.

oneDNN on AVX-512 CPUs: MindSpore 2.10 hands its CPU convolutions plain NCHW memory, for which the
bundled oneDNN picks ``jit_uni_ncsp`` on AVX-512 machines, about 150x slower than the ``gemm:jit``
kernel it picks when limited to AVX2 (4.4 s against 0.03 s for the Conv2d size's forward, measured
with ``ONEDNN_VERBOSE=1``). Unless ``ONEDNN_MAX_CPU_ISA`` is already set, this script sets it to
``AVX2`` before MindSpore loads, so that the convolution sizes time the convolution and not that
kernel choice; the value used is saved with the machine info. Set ``ONEDNN_MAX_CPU_ISA=ALL`` to time
oneDNN's own choice.

Every timed call waits for its result (:func:`_finished`): MindSpore runs graphs asynchronously on the
CPU as well. Results before 2026-12-02 did not wait, and charged some calls with an earlier variant's
work (the 2.47x of the fused Dense 1024 training step on 2026-11-23, which no timing that waited reproduced).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

# Read by oneDNN when MindSpore loads it: must come before the import (see the module docstring).
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
from mindspore import Tensor, nn, ops  # noqa: E402

from xnorm.conformance.adapters.mindspore_community import AssignWeightNorm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402 - a sibling file, not a package

import xnorm  # noqa: E402

#: size -> (layer factory, input shape); shapes in torch's layout, as in harness.SIZES. MindSpore's
#: convolutions default to no bias and pad_mode="same": these match torch's layers (bias, zero padding).
LAYERS: Dict[str, Tuple[Callable[[], nn.Cell], Tuple[int, ...]]] = {
    "linear-64": (lambda: nn.Dense(64, 64), (8, 64)),
    "linear-1024": (lambda: nn.Dense(1024, 1024), (64, 1024)),
    "conv1d-512-k7": (lambda: nn.Conv1d(512, 512, 7, pad_mode="pad", padding=3, has_bias=True), (8, 512, 4096)),
    "conv2d-64-3x3": (lambda: nn.Conv2d(64, 64, 3, pad_mode="pad", padding=1, has_bias=True), (16, 64, 64, 64)),
}
assert set(LAYERS) == set(harness.SIZES), "bench_mindspore.LAYERS must cover harness.SIZES"

#: Default repetitions per size: cheap sizes afford many, the vocoder Conv1d (seconds per step) few.
DEFAULT_REPEATS = {"linear-64": 21, "linear-1024": 21, "conv1d-512-k7": 5, "conv2d-64-3x3": 11}
#: Warm-up calls per variant before timing (the first call compiles the graph).
DEFAULT_WARMUP = {"linear-64": 3, "linear-1024": 3, "conv1d-512-k7": 1, "conv2d-64-3x3": 2}
COMPILE_REPEATS = 5
COMPILE_SIZE = "small-model"

LEARNING_RATE = 1e-4  # small: thousands of steps must not drive the weights to zero or infinity
TRAIN_VARIANTS = ("plain", "xnorm", "xnorm-fused")
FORWARD_VARIANTS = ("plain", "xnorm", "xnorm-fused", "native:assign-wrapper")
INFERENCE_VARIANTS = ("plain", "removed", "xnorm", "xnorm-fused")
COMPILE_VARIANTS = ("plain", "xnorm", "xnorm-fused")


def _finished(output: Tensor) -> Tensor:
    """``output`` once computed. MindSpore 2.10 runs graphs asynchronously on the CPU too: a Dense 1024 training
    step returns after about 4 of its 10 ms (measured), so without this a timed call is charged with whatever
    earlier call it waits behind, another variant's under round-robin. ``mindspore.runtime.synchronize()``
    refuses the CPU; ``asnumpy`` waits for the tensor and, on the CPU, copies nothing (0.02 ms for 64 MB)."""
    output.asnumpy()
    return output


def _seeded(factory: Callable[[], nn.Cell], seed: int = 0) -> Callable[[], nn.Cell]:
    """A factory whose layers all start from the same weights and bias (drawn once)."""
    template = factory()
    rng = np.random.default_rng(seed)
    fan_in = int(np.prod(template.weight.shape[1:]))
    weight = (rng.standard_normal(template.weight.shape) / np.sqrt(fan_in)).astype(np.float32)
    bias = (rng.standard_normal(template.bias.shape) / np.sqrt(fan_in)).astype(np.float32)

    def build() -> nn.Cell:
        layer = factory()
        layer.weight.set_data(Tensor(weight.copy()))
        layer.bias.set_data(Tensor(bias.copy()))
        return layer

    return build


def build_variant(variant: str, build: Callable[[], nn.Cell]) -> nn.Cell:
    """A fresh layer from ``build`` with ``variant``'s weight norm (dim=0)."""
    layer = build()
    if variant == "plain":
        return layer
    if variant == "xnorm":
        return xnorm.wrap(layer, dim=0)
    if variant == "xnorm-fused":
        return xnorm.wrap(layer, dim=0, fused=True)
    if variant == "native:assign-wrapper":
        # the community pattern, kept as the counter-example (its g and v never train): dim=0
        return AssignWeightNorm(layer, axes=tuple(range(1, layer.weight.ndim)))
    if variant == "removed":
        return xnorm.remove(xnorm.wrap(layer, dim=0))
    raise ValueError(f"unknown variant {variant!r}")


def train_step(cell: nn.Cell) -> Callable[[Tensor], Tensor]:
    """One compiled training step: forward, mean(y**2), backward and nn.SGD in one mindspore.jit graph."""
    cell.set_train(True)
    optimizer = nn.SGD(cell.trainable_params(), learning_rate=LEARNING_RATE)

    def loss_fn(x):
        return ops.square(cell(x)).mean()

    grad_fn = ms.value_and_grad(loss_fn, None, optimizer.parameters)

    @ms.jit
    def step(x):
        loss, grads = grad_fn(x)
        optimizer(grads)
        return loss

    return step


def spectral_candidates(size: str) -> Dict[str, Callable[[], Tensor]]:
    """Compiled training steps of ``size``'s layer, plain and with xnorm's spectral norm (MindSpore has none of its
    own), from the same weights; the wrapper starts in training mode, so every step iterates once and assigns
    the new u and v."""
    factory, input_shape = LAYERS[size]
    build = _seeded(factory)
    x = Tensor(np.random.default_rng(1).standard_normal(input_shape).astype(np.float32))
    steps = {"plain": train_step(build()), "xnorm": train_step(xnorm.spectral_norm(build()))}
    return {variant: (lambda step=step: _finished(step(x))) for variant, step in steps.items()}


def orthogonal_candidates(features: int, orthogonal_map: str) -> Dict[str, Callable[[], Tensor]]:
    """Compiled training steps of a square Dense, plain and with xnorm's orthogonal (MindSpore has none of its
    own), from the same weights."""
    build = _seeded(lambda: nn.Dense(features, features))
    x = Tensor(np.random.default_rng(1).standard_normal((64, features)).astype(np.float32))
    steps = {"plain": train_step(build()), "xnorm": train_step(xnorm.orthogonal(build(), orthogonal_map))}
    return {variant: (lambda step=step: _finished(step(x))) for variant, step in steps.items()}


def forward_call(cell: nn.Cell, *, training: bool) -> Callable[[Tensor], Tensor]:
    cell.set_train(training)
    return cell


def run_size(group: str, size: str, repeats: int, warmup: int, min_rep_seconds: float) -> List[harness.Measurement]:
    factory, input_shape = LAYERS[size]
    build = _seeded(factory)
    x = Tensor(np.random.default_rng(1).standard_normal(input_shape).astype(np.float32))
    rows = []
    tasks = (("train", TRAIN_VARIANTS), ("forward", FORWARD_VARIANTS), ("inference", INFERENCE_VARIANTS))
    for task, variants in tasks:
        candidates = {}
        for variant in variants:
            cell = build_variant(variant, build)
            if task == "train":
                fn = train_step(cell)
            else:
                fn = forward_call(cell, training=task == "forward")
            candidates[variant] = lambda fn=fn: _finished(fn(x))
        times = harness.interleave(candidates, repeats=repeats, warmup=warmup, min_rep_seconds=min_rep_seconds)
        note = {
            "train": f"GRAPH_MODE; jit(value_and_grad + nn.SGD lr={LEARNING_RATE:g}); loss mean(y**2); dim=0",
            "forward": "GRAPH_MODE Cell call, set_train(True); dim=0",
            "inference": "GRAPH_MODE Cell call, set_train(False); dim=0",
        }[task]
        for variant in variants:
            extra_note = note + ("; forward only: its gradients miss g and v" if variant.startswith("native:") else "")
            rows.append(harness.Measurement(group, size, task, variant, times[variant], note=extra_note))
    return rows


# -- compile time --------------------------------------------------------------------------------------
class SmallModel(nn.Cell):
    """4 Conv1d + 2 Dense, each optionally wrapped: a stand-in for a vocoder block's compile cost."""

    def __init__(self, wrap: Callable[[nn.Cell], nn.Cell]):
        super().__init__()
        channels = (8, 16, 16, 16, 16)
        self.convs = nn.CellList(
            [
                wrap(nn.Conv1d(channels[i], channels[i + 1], 5, pad_mode="pad", padding=2, has_bias=True))
                for i in range(4)
            ]
        )
        self.hidden = wrap(nn.Dense(16 * 32, 64))
        self.head = wrap(nn.Dense(64, 4))
        self.act = nn.LeakyReLU(0.1)

    def construct(self, x):
        for conv in self.convs:
            x = self.act(conv(x))
        return self.head(self.act(self.hidden(x.reshape(x.shape[0], -1))))


def _compile_wrapper(variant: str) -> Callable[[nn.Cell], nn.Cell]:
    if variant == "plain":
        return lambda layer: layer
    fused = variant == "xnorm-fused"
    return lambda layer: xnorm.wrap(layer, dim=0, fused=fused)


def run_compile(group: str, repeats: int) -> List[harness.Measurement]:
    """First call minus a warm call of a fresh model's jit training step, round-robin over the variants."""
    x = Tensor(np.random.default_rng(2).standard_normal((4, 8, 32)).astype(np.float32))
    times: Dict[str, List[float]] = {variant: [] for variant in COMPILE_VARIANTS}
    extra: Dict[str, List[float]] = {variant: [] for variant in COMPILE_VARIANTS}
    names = list(COMPILE_VARIANTS)
    for rep in range(repeats):
        shift = rep % len(names)
        for variant in names[shift:] + names[:shift]:
            step = train_step(SmallModel(_compile_wrapper(variant)))
            start = time.perf_counter()
            _finished(step(x))
            first = time.perf_counter()
            _finished(step(x))
            warm = time.perf_counter()
            times[variant].append(((first - start) - (warm - first)) * 1e3)
            extra[variant].append((warm - first) * 1e3)
    return [
        harness.Measurement(
            group,
            COMPILE_SIZE,
            "compile",
            variant,
            times[variant],
            note="4 Conv1d(8->16, k5) + 2 Dense, jit(value_and_grad + nn.SGD), input (4, 8, 32); "
            "first call minus a warm call",
            extra={"warm_call_ms": statistics.median(extra[variant])},
        )
        for variant in COMPILE_VARIANTS
    ]


# -- report -----------------------------------------------------------------------------------------
def ratio(rows: List[harness.Measurement], variant: str, baseline: str) -> Optional[float]:
    """Median over repetitions of the per-repetition ratio ``variant / baseline`` (rows of one interleave)."""
    by_variant = {row.variant: row.per_call_ms for row in rows}
    if variant not in by_variant or baseline not in by_variant:
        return None
    pairs = [(a, b) for a, b in zip(by_variant[variant], by_variant[baseline], strict=True) if b > 0]
    return statistics.median(a / b for a, b in pairs) if pairs else None


def print_table(rows: List[harness.Measurement]) -> None:
    order = list(LAYERS) + [COMPILE_SIZE]
    rows = [row for row in rows if not harness.is_reparametrization_group(row.group)]
    tasks = ("train", "forward", "inference", "compile")
    keys = sorted(
        {(row.group, row.size, row.task) for row in rows}, key=lambda k: (k[0], order.index(k[1]), tasks.index(k[2]))
    )
    print("\nmedian per-repetition ratios (lower is faster); plain ms = median time per call of the plain layer")
    header = (
        f"{'group':<16} {'size':<14} {'task':<10} {'plain ms':>9} {'xnorm':>7} {'fused':>7} {'assign':>7} "
        f"{'removed':>7} {'best/assign':>12}"
    )
    print(header)
    print("-" * len(header))
    for group, size, task in keys:
        these = [row for row in rows if (row.group, row.size, row.task) == (group, size, task)]
        plain_ms = next(row.median_ms for row in these if row.variant == "plain")

        def cell(variant, baseline="plain", these=these):
            value = ratio(these, variant, baseline)
            return f"{value:7.3f}" if value is not None else f"{'-':>7}"

        best = [(ratio(these, mode, "native:assign-wrapper"), mode) for mode in ("xnorm", "xnorm-fused")]
        best = [(r, mode) for r, mode in best if r is not None]
        best_text = f"{min(best)[0]:.3f} ({'fused' if min(best)[1] == 'xnorm-fused' else 'xnorm'})" if best else "-"
        print(
            f"{group:<16} {size:<14} {task:<10} {plain_ms:9.3f} {cell('xnorm')} {cell('xnorm-fused')} "
            f"{cell('native:assign-wrapper')} {cell('removed')} {best_text:>12}"
        )
    print("columns xnorm..removed: variant / plain; assign = the ops.Assign community wrapper (forward only)")


def main(argv: Optional[List[str]] = None) -> int:
    args, sizes = harness.parse_args(
        __doc__.split("\n\n")[0],
        argv,
        quick_help="a smoke test: 2 repetitions, tiny warm-up",
        sizes_help="; the compile task always runs",
        add_arguments=lambda parser: parser.add_argument(
            "--graph-kernel", action="store_true",
            help="every graph with MindSpore's graph kernel fusion (enable_graph_kernel=True; needs the "
            "'decorator' package): groups graph-kernel/<device>, saved as mindspore-graph-kernel.json"),
    )

    ms.set_context(mode=ms.GRAPH_MODE, enable_graph_kernel=args.graph_kernel)
    mode = "graph-kernel" if args.graph_kernel else "graph"
    group = f"{mode}/{ms.get_context('device_target').lower()}"
    rows: List[harness.Measurement] = []
    started = time.perf_counter()
    for size in sizes:
        if args.quick:
            repeats, warmup, min_rep_seconds = args.repeats or 2, 1, 0.0
        else:
            repeats, warmup, min_rep_seconds = args.repeats or DEFAULT_REPEATS[size], DEFAULT_WARMUP[size], 0.1
        size_start = time.perf_counter()
        rows += run_size(group, size, repeats, warmup, min_rep_seconds)
        print(f"{group} {size}: {time.perf_counter() - size_start:.1f} s", file=sys.stderr)
    train_note = f"GRAPH_MODE; jit(value_and_grad + nn.SGD lr={LEARNING_RATE:g}); loss mean(y**2)"
    rows += harness.spectral_rows(
        args, group, spectral_candidates, DEFAULT_REPEATS, DEFAULT_WARMUP,
        f"{train_note}; xnorm: one power iteration per step, u and v written back by ops.assign in the graph")
    rows += harness.orthogonal_rows(args, group, orthogonal_candidates, train_note)
    compile_start = time.perf_counter()
    rows += run_compile(group, args.repeats or (2 if args.quick else COMPILE_REPEATS))
    print(f"{group} {COMPILE_SIZE} compile: {time.perf_counter() - compile_start:.1f} s", file=sys.stderr)

    machine = harness.machine_info(
        mindspore=ms.__version__,
        mode="GRAPH_MODE" + (", enable_graph_kernel=True" if args.graph_kernel else ""),
        device_target=ms.get_context("device_target"),
        onednn_max_cpu_isa=os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        quick=str(args.quick),
    )
    path = harness.save("mindspore-graph-kernel" if args.graph_kernel else "mindspore", rows, machine, args.results_dir)
    print_table(rows)
    harness.print_native_table(rows)
    print(f"\n{len(rows)} rows in {time.perf_counter() - started:.0f} s, saved to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
