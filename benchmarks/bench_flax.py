"""Benchmark of the Flax backend (linen and NNX): training step and inference, against the plain layer
and Flax's own ``WeightNorm``, at the four sizes of issue 6 (``harness.SIZES``).

    python benchmarks/bench_flax.py [--repeats N] [--sizes a,b] [--quick] [--results-dir DIR]

writes ``<results-dir>/flax.json`` (default ``benchmarks/results/``) and prints the median ratios.

Groups ``linen/cpu`` and ``nnx/cpu`` (and ``linen/gpu``, ``nnx/gpu`` when JAX has a GPU). Every
variant of one (group, size, task) is timed in ONE :func:`harness.interleave` call, so its ratios are
taken repetition by repetition. Everything is float32, weight norm with ``dim=0`` (torch's layout: one
norm per output channel), which is the axis Flax's ``WeightNorm`` keeps by default
(``feature_axes=-1``, the kernel's output features for ``Dense`` and ``Conv``).

Tasks and variants:

* ``train``: one training step, jitted: forward, loss = mean(y**2), backward, ``optax.sgd`` update;
  the callable blocks on the new parameters (``block_until_ready``). Variants ``plain``, ``xnorm``,
  ``xnorm-fused`` and the group's native weight norm (``native:linen.WeightNorm`` or
  ``native:nnx.WeightNorm``).
* ``train`` of spectral norm (groups ``<api>/<platform>/spectral``, sizes ``--spectral-sizes``, the
  layers above): ``plain``, ``xnorm`` (``xnorm.spectral_norm(layer)``; linen with ``variables=``) and the
  api's own (``native:linen.SpectralNorm`` or ``native:nnx.SpectralNorm``), one power iteration per
  step in training mode, every variant's default. Each step keeps the power-iteration state it writes
  for the next, as training does: linen steps call ``update_stats=True`` with ``batch_stats`` mutable and
  feed the returned ``batch_stats`` to the next step; NNX steps carry it in the split state.
* ``train`` of the orthogonal parametrization (groups ``<api>/<platform>/orth-<map>``,
  ``harness.ORTHOGONAL_SIZES``): ``plain`` and ``xnorm`` (``xnorm.orthogonal(layer, map)``); Flax has no
  orthogonal parametrization of its own.
* ``inference``: one jitted forward (NNX in eval mode), blocking on the output. Variants ``plain``,
  ``removed`` (``xnorm.remove`` of the wrapped layer), ``xnorm``, ``xnorm-fused`` and the native.

linen steps are ``jax.jit`` of a pure function of the params. NNX steps use ``nnx.split`` once, then
``jax.jit`` of a function that does ``nnx.merge`` of the state, the update and ``nnx.state``: that is
NNX's own recommended fast path, and it is faster than ``nnx.jit``, whose graph traversal on every call
costs more than the whole Linear 64->64 step on a CPU.

Flax's ``nnx.WeightNorm`` keeps its scales in a plain dict (``nnx.data``), not in ``nnx.Param``s, and
writes the normalised kernel back into the wrapped layer on every call: its step trains what it
exposes as ``nnx.Param`` (the layer's kernel and bias), and that is noted in its rows. Its
``nnx.SpectralNorm`` likewise writes ``W / sigma`` back into the layer's kernel: the next step iterates on
and trains that. Both of Flax's spectral norms flatten the kernel to ``(-1, out_features)`` and store u
and sigma: for ``Dense`` and ``Conv`` that is xnorm's ``dim=0`` matrix transposed, rows reordered, so
sigma is the same and one iteration costs the same two matrix-vector products (noted in their rows).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import xnorm  # noqa: E402

LEARNING_RATE = 1e-3

#: size -> repetitions, and warmup calls per variant, of a default run. The Conv1d vocoder size is ~60 GFLOP
#: per forward: one call per repetition there (min_rep_seconds is far below one step).
DEFAULT_REPEATS = {"linear-64": 15, "linear-1024": 11, "conv2d-64-3x3": 9, "conv1d-512-k7": 5}
DEFAULT_WARMUP = {"linear-64": 3, "linear-1024": 3, "conv2d-64-3x3": 2, "conv1d-512-k7": 1}
#: --quick: shapes shrunk so that a smoke run takes about a minute; recorded in each row's note.
QUICK_SHAPES = {"conv1d-512-k7": dict(length=256, channels=64), "conv2d-64-3x3": dict(hw=16)}


# ------------------------------------------------------------------------------------------------
# layers and inputs (Flax is channels-last)
# ------------------------------------------------------------------------------------------------
def make_size(size: str, quick: bool) -> Tuple[Callable[[], nn.Module], Callable[[], nnx.Module], Tuple[int, ...], str]:
    """``(linen factory, NNX factory, input shape, note)`` for one of ``harness.SIZES``."""
    shrink = QUICK_SHAPES.get(size, {}) if quick else {}
    if size in ("linear-64", "linear-1024"):
        features, batch = (64, 8) if size == "linear-64" else (1024, 64)
        return (
            lambda: nn.Dense(features),
            lambda: nnx.Linear(features, features, rngs=nnx.Rngs(0)),
            (batch, features),
            "",
        )
    if size == "conv1d-512-k7":
        channels, length = shrink.get("channels", 512), shrink.get("length", 4096)
        note = f"--quick: {channels} channels, {length} samples" if shrink else ""
        return (
            lambda: nn.Conv(channels, (7,), padding=[(3, 3)]),
            lambda: nnx.Conv(channels, channels, (7,), padding=[(3, 3)], rngs=nnx.Rngs(0)),
            (8, length, channels),
            note,
        )
    if size == "conv2d-64-3x3":
        hw = shrink.get("hw", 64)
        note = f"--quick: {hw}x{hw}" if shrink else ""
        return (
            lambda: nn.Conv(64, (3, 3), padding=[(1, 1), (1, 1)]),
            lambda: nnx.Conv(64, 64, (3, 3), padding=[(1, 1), (1, 1)], rngs=nnx.Rngs(0)),
            (16, hw, hw, 64),
            note,
        )
    raise SystemExit(f"unknown size {size!r}; choose from {', '.join(harness.SIZES)}")


def _loss(y):
    return jnp.mean(jnp.square(y))


# ------------------------------------------------------------------------------------------------
# linen
# ------------------------------------------------------------------------------------------------
def _linen_train(module: nn.Module, params, x, state=None, *, update_stats: bool = False) -> Callable[[], object]:
    """``state``: the module's other collections. By default it reads them and never writes them (the orthogonal
    ``batch_stats``). ``update_stats=True`` is a training-mode use of a spectral norm (the keyword of xnorm's
    and Flax's linen wrappers): the collections are mutable, and each step feeds the state it returns into
    the next, as a training loop does."""
    tx = optax.sgd(LEARNING_RATE)
    state = dict(state or {})
    # read-only state stays a constant of the jitted step, as before; only written state travels through it
    fixed, carried = ({}, state) if update_stats else (state, {})
    apply_options = {"update_stats": True, "mutable": list(carried)} if update_stats else {}

    def loss(params, carried, x):
        out = module.apply({"params": params, **fixed, **carried}, x, **apply_options)
        y, carried = out if update_stats else (out, carried)
        return _loss(y), carried

    @jax.jit
    def step(params, opt_state, carried, x):
        grads, carried = jax.grad(loss, has_aux=True)(params, carried, x)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, carried

    box = [params, tx.init(params), carried]

    def call():
        box[0], box[1], box[2] = step(box[0], box[1], box[2], x)
        jax.block_until_ready((box[0], box[2]))

    return call


def _linen_inference(module: nn.Module, variables, x) -> Callable[[], object]:
    apply = jax.jit(module.apply)
    return lambda: jax.block_until_ready(apply(variables, x))


def linen_candidates(size: str, task: str, quick: bool) -> Tuple[Dict[str, Callable[[], object]], Dict[str, str]]:
    make_linen, _, shape, note = make_size(size, quick)
    x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    layer = make_linen()
    variables = layer.init(jax.random.key(0), x)
    wrapped, wrapped_vars = xnorm.wrap(layer, dim=0, variables=variables)
    fused, fused_vars = xnorm.wrap(layer, dim=0, variables=variables, fused=True)
    native = nn.WeightNorm(make_linen())  # feature_axes=-1: the output features of Dense and Conv
    native_vars = native.init(jax.random.key(0), x)
    notes = {name: note for name in ("plain", "xnorm", "xnorm-fused", "native:linen.WeightNorm", "removed")}
    if task == "train":
        return {
            "plain": _linen_train(layer, variables["params"], x),
            "xnorm": _linen_train(wrapped, wrapped_vars["params"], x),
            "xnorm-fused": _linen_train(fused, fused_vars["params"], x),
            "native:linen.WeightNorm": _linen_train(native, native_vars["params"], x),
        }, notes
    removed, removed_vars = xnorm.remove(wrapped, wrapped_vars)
    return {
        "plain": _linen_inference(layer, variables, x),
        "removed": _linen_inference(removed, removed_vars, x),
        "xnorm": _linen_inference(wrapped, wrapped_vars, x),
        "xnorm-fused": _linen_inference(fused, fused_vars, x),
        "native:linen.WeightNorm": _linen_inference(native, native_vars, x),
    }, notes


# ------------------------------------------------------------------------------------------------
# NNX: nnx.split once, jax.jit of merge -> step -> state
# ------------------------------------------------------------------------------------------------
def _nnx_train(model: nnx.Module, x) -> Callable[[], object]:
    optimizer = nnx.Optimizer(model, optax.sgd(LEARNING_RATE), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    @jax.jit
    def step(state, x):
        model, optimizer = nnx.merge(graphdef, state)
        grads = nnx.grad(lambda m: _loss(m(x)))(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer))

    box = [state]

    def call():
        box[0] = step(box[0], x)
        jax.block_until_ready(box[0])

    return call


def _nnx_inference(model: nnx.Module, x) -> Callable[[], object]:
    model.eval()
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return lambda: jax.block_until_ready(forward(state, x))


NNX_NATIVE_NOTE = (
    "nnx.WeightNorm: its scales are nnx.data, not nnx.Param, so the step trains only the layer's kernel and "
    "bias (what it exposes); it also writes the normalised kernel back into the layer on every call"
)


def nnx_candidates(size: str, task: str, quick: bool) -> Tuple[Dict[str, Callable[[], object]], Dict[str, str]]:
    _, make_nnx, shape, note = make_size(size, quick)
    x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    notes = {name: note for name in ("plain", "xnorm", "xnorm-fused", "removed")}
    notes["native:nnx.WeightNorm"] = "; ".join(filter(None, (note, NNX_NATIVE_NOTE)))

    def native():
        return nnx.WeightNorm(make_nnx(), rngs=nnx.Rngs(0))

    if task == "train":
        return {
            "plain": _nnx_train(make_nnx(), x),
            "xnorm": _nnx_train(xnorm.wrap(make_nnx(), dim=0), x),
            "xnorm-fused": _nnx_train(xnorm.wrap(make_nnx(), dim=0, fused=True), x),
            "native:nnx.WeightNorm": _nnx_train(native(), x),
        }, notes
    return {
        "plain": _nnx_inference(make_nnx(), x),
        "removed": _nnx_inference(xnorm.remove(xnorm.wrap(make_nnx(), dim=0)), x),
        "xnorm": _nnx_inference(xnorm.wrap(make_nnx(), dim=0), x),
        "xnorm-fused": _nnx_inference(xnorm.wrap(make_nnx(), dim=0, fused=True), x),
        "native:nnx.WeightNorm": _nnx_inference(native(), x),
    }, notes


SPECTRAL_NOTES = {
    "plain": "",
    "xnorm": "xnorm.spectral_norm in training mode: one power iteration per step, the new u and v carried into "
    "the next step",
    "native:linen.SpectralNorm": "update_stats=True: one power iteration per step, the new u and sigma "
    "(batch_stats) carried into the next step",
    "native:nnx.SpectralNorm": "update_stats=True (its default): one power iteration per step, u and sigma "
    "stored; it also writes W/sigma back into the layer's kernel, so each step iterates on and trains the "
    "previous step's normalised kernel",
}
FLAX_SPECTRAL_VIEW_NOTE = (
    "Flax flattens the kernel to (-1, out_features): for Dense and Conv the transpose of xnorm's dim=0 matrix "
    "with its rows in another order (the same sigma); it stores u (out_features) and sigma, where xnorm stores "
    "u and v"
)


def spectral_candidates(api: str, size: str, quick: bool) -> Dict[str, Callable[[], object]]:
    """Training steps of ``size``'s layer (the weight-norm rows' layer), plain and with each spectral norm, all
    from the plain layer's weights. u (and v) are each implementation's own draw: one iteration's cost does
    not depend on them."""
    make_linen, make_nnx, shape, _ = make_size(size, quick)
    x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    if api == "linen":
        layer = make_linen()
        variables = layer.init(jax.random.key(0), x)
        wrapped, wrapped_vars = xnorm.spectral_norm(layer, variables=variables, rngs=0)
        native = nn.SpectralNorm(make_linen())
        native_vars = native.init(jax.random.key(0), x, update_stats=False)
        (inner_scope,) = native_vars["params"]  # the wrapped layer's scope: given the plain layer's weights
        return {
            "plain": _linen_train(layer, variables["params"], x),
            "xnorm": _linen_train(wrapped, wrapped_vars["params"], x, {"batch_stats": wrapped_vars["batch_stats"]},
                                  update_stats=True),
            "native:linen.SpectralNorm": _linen_train(native, {inner_scope: variables["params"]}, x,
                                                      {"batch_stats": native_vars["batch_stats"]}, update_stats=True),
        }
    return {
        "plain": _nnx_train(make_nnx(), x),
        "xnorm": _nnx_train(xnorm.spectral_norm(make_nnx(), rngs=0), x),
        "native:nnx.SpectralNorm": _nnx_train(nnx.SpectralNorm(make_nnx(), rngs=nnx.Rngs(0)), x),
    }


def spectral_rows(args, api: str, platform: str, note: str) -> List[harness.Measurement]:
    """:func:`harness.spectral_rows` of one api, each row's note saying what its variant does per step."""
    rows = harness.spectral_rows(args, f"{api}/{platform}", lambda size: spectral_candidates(api, size, args.quick),
                                 DEFAULT_REPEATS, DEFAULT_WARMUP, note)
    for row in rows:
        native_view = FLAX_SPECTRAL_VIEW_NOTE if row.variant.startswith("native:") else ""
        quick_shapes = make_size(row.size, args.quick)[3]
        row.note = "; ".join(filter(None, (row.note, quick_shapes, SPECTRAL_NOTES[row.variant], native_view)))
    return rows


def orthogonal_candidates(api: str, features: int, orthogonal_map: str) -> Dict[str, Callable[[], object]]:
    """Training steps of a square Dense/Linear, plain and with xnorm's orthogonal (Flax has none of its own);
    square, so registration draws nothing; linen's kernel_base rides along in batch_stats, read-only."""
    x = jax.random.normal(jax.random.key(1), (64, features), jnp.float32)
    if api == "linen":
        layer = nn.Dense(features)
        variables = layer.init(jax.random.key(0), x)
        wrapped, wrapped_vars = xnorm.orthogonal(layer, orthogonal_map, variables=variables)
        return {
            "plain": _linen_train(layer, variables["params"], x),
            "xnorm": _linen_train(wrapped, wrapped_vars["params"], x, {"batch_stats": wrapped_vars["batch_stats"]}),
        }
    return {
        "plain": _nnx_train(nnx.Linear(features, features, rngs=nnx.Rngs(0)), x),
        "xnorm": _nnx_train(xnorm.orthogonal(nnx.Linear(features, features, rngs=nnx.Rngs(0)), orthogonal_map), x),
    }


# ------------------------------------------------------------------------------------------------
# running and reporting
# ------------------------------------------------------------------------------------------------
def platforms() -> List[str]:
    found = ["cpu"]
    try:
        if jax.devices("gpu"):
            found.append("gpu")
    except RuntimeError:  # no GPU backend in this jaxlib
        pass
    return found


def run(sizes: List[str], repeats: int | None, quick: bool) -> List[harness.Measurement]:
    rows: List[harness.Measurement] = []
    builders = {"linen": linen_candidates, "nnx": nnx_candidates}
    for platform in platforms():
        device = jax.devices(platform)[0]
        for api, build in builders.items():
            group = f"{api}/{platform}"
            for size in sizes:
                for task in ("train", "inference"):
                    start = time.perf_counter()
                    with jax.default_device(device):
                        candidates, notes = build(size, task, quick)
                        times = harness.interleave(
                            candidates,
                            repeats=2 if quick else (repeats or DEFAULT_REPEATS[size]),
                            warmup=1 if quick else DEFAULT_WARMUP[size],
                            min_rep_seconds=0.02 if quick else 0.1,
                        )
                    for variant, per_call in times.items():
                        rows.append(harness.Measurement(group, size, task, variant, per_call, notes.get(variant, "")))
                    plain = statistics.median(times["plain"])
                    print(
                        f"  {group:10s} {size:14s} {task:9s} plain {plain:9.3f} ms/step "
                        f"({time.perf_counter() - start:.0f} s incl. compiles)",
                        flush=True,
                    )
    return rows


def median_ratio(a: List[float], b: List[float]) -> float:
    """Median over repetitions of a/b: the repetitions of one interleave call are side by side."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def print_table(rows: List[harness.Measurement]) -> None:
    by_key: Dict[Tuple[str, str, str], Dict[str, harness.Measurement]] = {}
    for row in rows:
        by_key.setdefault((row.group, row.size, row.task), {})[row.variant] = row
    print("\nmedian ratios (per repetition, then median): variant / plain and variant / native")
    print(f"{'group':10s} {'size':14s} {'task':9s} {'variant':24s} {'ms':>10s} {'/plain':>7s} {'/native':>8s}")
    for (group, size, task), variants in by_key.items():
        if harness.is_reparametrization_group(group):
            continue
        plain = variants["plain"].per_call_ms
        native = next((row.per_call_ms for name, row in variants.items() if name.startswith("native:")), None)
        for name, row in variants.items():
            vs_native = f"{median_ratio(row.per_call_ms, native):8.3f}" if native and name.startswith("xnorm") else ""
            print(
                f"{group:10s} {size:14s} {task:9s} {name:24s} {row.median_ms:10.3f} "
                f"{median_ratio(row.per_call_ms, plain):7.3f} {vs_native:>8s}"
            )


def main(argv: List[str] | None = None) -> int:
    args, sizes = harness.parse_args(
        __doc__.split("\n\n")[0], argv, quick_help="smoke run: 2 repetitions and shrunk conv shapes"
    )

    np.random.seed(0)
    rows = run(sizes, args.repeats, args.quick)
    note = f"jax.jit step; optax.sgd lr={LEARNING_RATE:g}; loss mean(y**2)"
    for platform in platforms():
        with jax.default_device(jax.devices(platform)[0]):
            for api in ("linen", "nnx"):
                rows += spectral_rows(args, api, platform, note)
                rows += harness.orthogonal_rows(
                    args, f"{api}/{platform}", lambda features, orthogonal_map, api=api: orthogonal_candidates(
                        api, features, orthogonal_map), note)
    machine = harness.machine_info(
        jax=jax.__version__,
        flax=_version("flax"),
        optax=_version("optax"),
        devices=", ".join(str(d) for p in platforms() for d in jax.devices(p)),
        quick=str(args.quick).lower(),
    )
    path = harness.save("flax", rows, machine, args.results_dir)
    print_table(rows)
    harness.print_native_table(rows)
    print(f"\nsaved {path}")
    return 0


def _version(dist: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(dist)


if __name__ == "__main__":
    raise SystemExit(main())
