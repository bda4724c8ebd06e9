"""Spectral normalization for the Flax backend: ``xnorm.spectral_norm(layer, ...)`` on linen and NNX.

The wrappers compute the layer with ``w = W / sigma(W)`` in place of its weight, as
:class:`xnorm.spec.SpectralNorm` defines it (torch's ``parametrizations.spectral_norm``):

* the matrix view ``M`` is the weight in torch's (canonical) layout with ``dim`` moved first and the
  other axes flattened, ``(h, w)``; it is read straight from Flax's storage layout with one transpose
  (:func:`matrix_axes`), so ``u`` (h) and ``v`` (w) are torch's vectors, element for element, whatever
  Flax stores (a ``Dense`` kernel is ``(in, out)``, torch's weight ``(out, in)``: ``u`` has ``out``
  entries for the default ``dim=0``). ``dim=None`` is 1 for ``ConvTranspose``, else 0;
* state ``u``, ``v``: unit vectors in the compute dtype (float32 for float16/bfloat16 weights). At
  wrap: N(0, 1) draws from a JAX key, normalized, then 15 power iterations;
* one iteration: ``u = normalize(M v)``, then ``v = normalize(M^T u)``, ``normalize(x) = x /
  max(||x||, eps)``; no gradient flows through u and v;
* a training-mode use iterates ``n_power_iterations`` times first and stores the new u and v; an
  eval-mode use never iterates. ``sigma = u . (M v)``; the gradient flows through W in the numerator
  and in sigma. A 1-D weight is ``W / max(||W||, eps)`` and has no state.

W itself is a trainable parameter, ``<name>_orig`` (torch's legacy name); ``W / sigma`` is never
written into any parameter (Flax's own NNX ``SpectralNorm`` writes it back into the layer's kernel).
u and v are state, not parameters, kept where Flax keeps batch statistics, so that training loops
that already carry those carry u and v too and no optimizer trains them:

* linen: the ``batch_stats`` collection (the one Flax's own linen ``SpectralNorm`` and ``BatchNorm``
  use), as ``<name>_u`` and ``<name>_v`` at the wrapper's own path. Each call says its mode with the
  keyword ``update_stats`` (Flax's linen ``SpectralNorm`` name): ``True`` iterates and writes u and v,
  so ``batch_stats`` must be mutable (``apply(..., mutable=["batch_stats"])``); ``False`` reads them.
  The initial draws come from the ``params`` rng of ``init``, or, for ``xnorm.wrap(...,
  variables=...)``, from ``rngs=`` (a JAX key, an int seed or an ``nnx.Rngs``).
* NNX: ``nnx.BatchStat`` attributes ``<name>_u`` and ``<name>_v`` (``nnx.Optimizer(model, tx,
  wrt=nnx.Param)`` does not train them). The mode is the attribute ``use_running_average`` (the one
  ``nnx.Module.train()``/``eval()`` and ``nnx.view`` switch in flax 0.12, and the one Flax's NNX
  ``SpectralNorm`` and ``BatchNorm`` read): ``False`` (a fresh wrapper, or after ``train()``)
  iterates, ``True`` (after ``eval()``) does not. The draws come from ``rngs=`` (an ``nnx.Rngs``, its
  ``params`` stream, as Flax layers take them; or a JAX key or an int seed).

Removal materializes ``w`` once; a training-mode removal (linen ``update_stats=True``, NNX not in
eval mode) first iterates as a training-mode use would, as torch's removal in training mode does.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from xnorm.errors import MissingParameterError, OptionError
from xnorm.spec import SPECTRAL_INIT_ITERATIONS, SpectralNorm

from . import (
    _LOW_PRECISION,
    NNXLayerCopy,
    _kind,
    _replace_entry,
    _same_mapping_type,
    linen_initial_params,
    partitioning,
    storage_layout,
)

__all__ = [
    "STATE_COLLECTION",
    "LinenSpectralNorm",
    "NNXSpectralNorm",
    "matrix_axes",
    "spectral_weight",
    "initial_state",
    "draw_key",
    "linen_spectral_weight",
    "plain_linen_variables",
]

#: The linen collection holding u and v (Flax's own SpectralNorm and BatchNorm keep their state there).
STATE_COLLECTION = "batch_stats"


# ------------------------------------------------------------------------------------------------
# The math, read from Flax's storage layout
# ------------------------------------------------------------------------------------------------
def matrix_axes(layer: Any, name: str, spec: SpectralNorm, ndim: int) -> Tuple[int, ...]:
    """The storage axes of parameter ``name`` (rank ``ndim``) of ``layer`` in the order of the matrix
    view: the canonical ``dim`` first, then the other canonical axes in their canonical order.

    ``jnp.transpose(kernel, axes).reshape(h, -1)`` is then torch's matrix view. Raises DimError for a
    ``dim`` outside the weight's rank (read in torch's layout; ``None`` is 1 for ConvTranspose, else 0).
    """
    dim = spec.resolved_dim(ndim, _kind(layer, name)[0])
    layout = storage_layout(layer, name, ndim)
    canonical = (dim, *(axis for axis in range(ndim) if axis != dim))
    return tuple(layout.storage_axis(axis) for axis in canonical)


def _work_dtype(dtype) -> jnp.dtype:
    """The dtype u, v, sigma and ``W / sigma`` are computed in: float32 for float16/bfloat16 weights."""
    return jnp.dtype(jnp.float32) if jnp.dtype(dtype) in _LOW_PRECISION else jnp.dtype(dtype)


def _matrix_shape(weight, axes: Tuple[int, ...]) -> Tuple[int, int]:
    """``(h, w)`` of the matrix view: the size of the ``dim`` axis, and the product of the others."""
    h = weight.shape[axes[0]]
    return h, weight.size // h


class _MatrixView:
    """The ``(h, w)`` matrix view ``M`` of a storage-layout weight, in the compute dtype, as its two products.

    Where ``dim`` is the storage's last axis and the others keep their order (Dense, Conv and Embedding
    at their default ``dim``), the stored weight reshaped to ``(w, h)`` is ``M^T`` itself, and the
    products read it as stored. A transposed copy of the weight costs XLA's CPU backend a pass over it
    and a slower dot each time: at Dense 1024 the training step took 2.8x the plain one that way and
    1.35x this way (measured on 2026-12-02). Other axes are transposed.
    """

    def __init__(self, weight, axes: Tuple[int, ...]):
        work = weight.astype(_work_dtype(weight.dtype))
        self.h, self.w = _matrix_shape(weight, axes)
        self.dtype = work.dtype
        if axes == (weight.ndim - 1, *range(weight.ndim - 1)):
            self._transposed, self._matrix = work.reshape(self.w, self.h), None
        else:
            self._transposed, self._matrix = None, jnp.transpose(work, axes).reshape(self.h, self.w)

    def times(self, x):
        """``M @ x`` for ``x`` of shape ``(w,)``."""
        return self._matrix @ x if self._transposed is None else x @ self._transposed

    def transposed_times(self, y):
        """``M^T @ y`` for ``y`` of shape ``(h,)``."""
        return self._matrix.T @ y if self._transposed is None else self._transposed @ y


def _normalize(x, eps: float):
    """``x / max(||x||, eps)`` (torch's ``F.normalize``): a zero vector stays zero."""
    return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x)), eps)


def _iterate(matrix: _MatrixView, u, v, iterations: int, eps: float):
    """``iterations`` times: ``u = normalize(M v)``, then ``v = normalize(M^T u)``."""
    for _ in range(iterations):
        u = _normalize(matrix.times(v), eps)
        v = _normalize(matrix.transposed_times(u), eps)
    return u, v


def spectral_weight(weight, u, v, axes: Tuple[int, ...], eps: float, iterations: int):
    """:func:`_spectral_weight`, with Explicit mesh axes made Auto for it (:func:`.partitioning.auto_axes_call`)."""
    if weight.ndim == 1:
        return _spectral_weight(weight, u, v, axes, eps, iterations)
    return partitioning.auto_axes_call(
        lambda weight, u, v: _spectral_weight(weight, u, v, axes, eps, iterations),
        (weight, u, v), weight, (None, *state_partitioning(axes)),
    )


# jit: one program per shape where this runs eagerly (the weight outside apply, NNX's to_plain)
@functools.partial(jax.jit, static_argnames=("axes", "eps", "iterations"))
def _spectral_weight(weight, u, v, axes: Tuple[int, ...], eps: float, iterations: int):
    """One use of a spectral-normed weight: ``(w, u, v)`` after ``iterations`` power iterations.

    ``weight`` is W in Flax's storage layout; ``u`` (h) and ``v`` (w) are the stored state in the
    compute dtype (None for a 1-D weight, which is ``W / max(||W||, eps)``); ``axes`` is
    :func:`matrix_axes`. ``w`` has the weight's shape and dtype (computed in float32 for
    float16/bfloat16 and cast back once); the returned u and v carry no gradient. ``iterations=0``
    is an eval-mode use and returns u and v unchanged.
    """
    work = _work_dtype(weight.dtype)
    if weight.ndim == 1:
        return _normalize(weight.astype(work), eps).astype(weight.dtype), u, v
    u, v = _iterate(_MatrixView(jax.lax.stop_gradient(weight), axes), u, v, iterations, eps)
    # also without iterations: the stored u, v may be traced arguments (a jax.grad over all variables)
    u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
    sigma = jnp.dot(u, _MatrixView(weight, axes).times(v))
    return (weight.astype(work) / sigma).astype(weight.dtype), u, v


def initial_state(weight, key, axes: Tuple[int, ...], eps: float):
    """``(u, v)`` right after wrapping a weight of rank > 1: N(0, 1) draws from ``key`` (u from its first
    split, v from its second), normalized, then ``SPECTRAL_INIT_ITERATIONS`` iterations; with Explicit
    mesh axes made Auto for it (:func:`.partitioning.auto_axes_call`)."""
    return partitioning.auto_axes_call(
        lambda weight, key: _initial_state(weight, key, axes, eps), (weight, key), weight, state_partitioning(axes)
    )


#: The smallest size the initial draws are made at (see :func:`_draw_size`).
DRAW_SIZE_MIN = 64


def _draw_size(count: int, key) -> int:
    """How many N(0, 1) values to draw from ``key`` for the first ``count`` of them.

    With JAX's default generator (threefry, ``jax_threefry_partitionable``, the default since JAX 0.5)
    each value depends only on the key and its index, so the first ``count`` of a longer draw are the
    draw of ``count`` itself, bit for bit (tests/flax/test_spectral.py checks it). Drawing at the next
    power of two (at least :data:`DRAW_SIZE_MIN`) and cutting makes the draw one compiled program per
    size class instead of one per weight shape: a threefry draw is about 0.25 s of XLA:CPU compile, two
    thirds of what wrapping a new weight shape compiled. Any other generator draws exactly ``count``."""
    prefix_stable = jax.config.jax_threefry_partitionable and str(jax.random.key_impl(key)) == "threefry2x32"
    return max(DRAW_SIZE_MIN, 1 << (count - 1).bit_length()) if prefix_stable else count


# jit: one program per draw size and dtype, shared by every weight shape whose draws round up to it
@functools.partial(jax.jit, static_argnames=("size", "dtype"))
def _standard_normal(key, size: int, dtype):
    return jax.random.normal(key, (size,), dtype)


def _initial_state(weight, key, axes: Tuple[int, ...], eps: float):
    h, w = _matrix_shape(weight, axes)
    dtype = _work_dtype(weight.dtype)
    key_u, key_v = jax.random.split(key)
    u = _standard_normal(key_u, _draw_size(h, key), dtype)
    v = _standard_normal(key_v, _draw_size(w, key), dtype)
    return _initial_iterations(weight, u, v, axes, eps)


@functools.partial(jax.jit, static_argnames=("axes", "eps"))
def _initial_iterations(weight, u_draw, v_draw, axes: Tuple[int, ...], eps: float):
    """The first ``h`` and ``w`` of the draws, normalized, then ``SPECTRAL_INIT_ITERATIONS`` iterations."""
    matrix = _MatrixView(weight, axes)
    u = _normalize(u_draw[: matrix.h], eps)
    v = _normalize(v_draw[: matrix.w], eps)
    # A loop, not 15 unrolled iterations: XLA compiles one iteration's body (about 4x less compile
    # time per weight shape, the same values; nothing differentiates through the initial state).
    return jax.lax.fori_loop(
        0, SPECTRAL_INIT_ITERATIONS, lambda _, state: _iterate(matrix, *state, 1, eps), (u, v)
    )


def draw_key(rngs: Any) -> jax.Array:
    """The JAX key spectral norm's initial draws come from: ``rngs`` is an ``nnx.Rngs`` (its ``params``
    stream is advanced, as a Flax layer's initializer does), a JAX key, or an int seed."""
    if isinstance(rngs, nnx.Rngs):
        return rngs.params()
    if isinstance(rngs, jax.Array) and (
        jnp.issubdtype(rngs.dtype, jax.dtypes.prng_key) or (rngs.dtype == jnp.uint32 and rngs.shape == (2,))
    ):
        return rngs
    if not isinstance(rngs, bool):
        try:
            return jax.random.key(operator.index(rngs))
        except TypeError:
            pass
    raise OptionError(
        f"rngs must be an nnx.Rngs, a JAX key (jax.random.key(0)) or an int seed, got {type(rngs).__name__}: "
        "spectral norm draws its initial u and v from it."
    )


def state_partitioning(axes: Tuple[int, ...]) -> Tuple[partitioning.Mapping, partitioning.Mapping]:
    """How u and v take the weight's partitioning names (:mod:`.partitioning`): u one entry per slice
    along ``dim``, v the other axes flattened in :func:`matrix_axes` order."""
    return partitioning.one_axis(axes[0]), partitioning.flattened_axes(axes[1:])


def _state_names(spec: SpectralNorm, name: str) -> Tuple[str, str, str]:
    """``(<name>_orig, <name>_u, <name>_v)``."""
    (original,) = spec.tensor_names(name)
    u_name, v_name = spec.state_names(name)
    return original, u_name, v_name


# ------------------------------------------------------------------------------------------------
# linen
# ------------------------------------------------------------------------------------------------
class LinenSpectralNorm(nn.Module):
    """A linen module computing ``layer`` with its parameter ``param_name`` spectral-normalized.

    Attributes:
        layer: the wrapped linen module, only ever run through an unbound copy (``layer.clone().apply``).
        param_name: the wrapped parameter (``"kernel"``; ``"embedding"`` for ``Embed``).
        n_power_iterations, eps, dim: :class:`xnorm.spec.SpectralNorm`'s options; ``dim`` is read in
            torch's layout (``None``: 1 for ``ConvTranspose``, else 0).

    Variables: ``params`` holds ``<param_name>_orig`` (W, the weight's storage shape and dtype) and
    the layer's other parameters under their own names; ``batch_stats`` holds ``<param_name>_u``
    (h,) and ``<param_name>_v`` (w,) of the matrix view, in the compute dtype (none for a 1-D weight).
    ``init`` takes W from the layer's own initializer and draws u and v from its ``params`` rng.

    Call: ``wrapper.apply(variables, *args, update_stats=..., **kwargs)``; the other arguments go to
    the layer. ``update_stats=True`` is a training-mode use: it iterates and writes u and v, so pass
    ``mutable=["batch_stats"]`` and keep the returned state; ``False`` is an eval-mode use. Leaving it
    out raises OptionError, as every use must say which it is (``init`` included: ``True`` there
    iterates once more after the initial iterations, like torch's registration in training mode).

    Raises (at ``init``, for layers whose weight xnorm cannot see before it exists):
        MissingParameterError, NonFloatingParameterError, DimError, UnsupportedLayerError (the layer
        creates variables outside ``params``).
    """

    layer: nn.Module
    param_name: str = "kernel"
    n_power_iterations: int = 1
    eps: float = 1e-12
    dim: Optional[int] = None

    def _spec(self) -> SpectralNorm:
        return SpectralNorm(n_power_iterations=self.n_power_iterations, eps=self.eps, dim=self.dim)

    @nn.compact
    def __call__(self, *args, update_stats: Optional[bool] = None, **kwargs):
        from .linen_model import plain_call, plain_wrappers

        if plain_wrappers():  # inside the plain view xnorm.remove returns for a whole model: no state
            return plain_call(self, args, kwargs)
        if not isinstance(update_stats, bool):
            raise OptionError(
                f"{type(self).__name__} needs update_stats=True (a training-mode use: iterate and write u, v "
                "into 'batch_stats', with mutable=['batch_stats']) or update_stats=False (eval mode), got "
                f"{update_stats!r}."
            )
        spec = self._spec()
        original, u_name, v_name = _state_names(spec, self.param_name)
        template = self.layer.clone()  # unbound: it reads w from us, never from a scope of its own
        if not self.has_variable("params", original) and self.is_mutable_collection("params"):
            initial = linen_initial_params(self, template, args, kwargs)
            boxed = initial[self.param_name]
            weight = partitioning.unbox(boxed)
            axes = matrix_axes(self.layer, self.param_name, spec, weight.ndim)
            initial = _replace_entry(initial, self.param_name, {original: boxed})
            values = {key: self.param(key, lambda _, value=value: value) for key, value in initial.items()}
            if weight.ndim > 1:
                u0, v0 = initial_state(weight, self.make_rng("params"), axes, self.eps)
                u_names, v_names = state_partitioning(axes)
                u0 = partitioning.linen_boxed(boxed, u0, u_names)
                v0 = partitioning.linen_boxed(boxed, v0, v_names)
                self.variable(STATE_COLLECTION, u_name, lambda: u0)
                self.variable(STATE_COLLECTION, v_name, lambda: v0)
        else:
            # Read directly: self.param would re-run an init function under eval_shape (there is none).
            values = partitioning.unbox(dict(self.variables.get("params", {})))
            if original not in values:
                raise MissingParameterError(
                    f"no param {original!r} at {self._path()}; pass the variables this wrapper's init returned "
                    "(or xnorm.wrap(..., variables=...)'s)."
                )
        weight = values.pop(original)
        axes = matrix_axes(self.layer, self.param_name, spec, weight.ndim)
        u = v = None
        if weight.ndim > 1:
            if not (self.has_variable(STATE_COLLECTION, u_name) and self.has_variable(STATE_COLLECTION, v_name)):
                raise MissingParameterError(
                    f"no {STATE_COLLECTION} {u_name!r}/{v_name!r} at {self._path()}: spectral norm's u and v live "
                    f"in '{STATE_COLLECTION}'. Pass every collection init returned, not only 'params'."
                )
            if update_stats and not self.is_mutable_collection(STATE_COLLECTION):
                raise OptionError(
                    f"update_stats=True writes u and v into '{STATE_COLLECTION}', which this apply does not make "
                    f"mutable: pass mutable=['{STATE_COLLECTION}'] and keep the state it returns, or "
                    "update_stats=False for an eval-mode use."
                )
            u = partitioning.unbox(self.get_variable(STATE_COLLECTION, u_name))
            v = partitioning.unbox(self.get_variable(STATE_COLLECTION, v_name))
        iterations = self.n_power_iterations if update_stats else 0
        w, u, v = spectral_weight(weight, u, v, axes, self.eps, iterations)
        if update_stats and weight.ndim > 1:
            # into the box they were stored in, so their partitioning survives training steps
            for key, value in ((u_name, u), (v_name, v)):
                stored = self.get_variable(STATE_COLLECTION, key)
                self.put_variable(STATE_COLLECTION, key, partitioning.linen_reboxed(stored, value))
        values[self.param_name] = w
        return template.apply({"params": values}, *args, **kwargs)

    def _path(self) -> str:
        return "/".join(self.scope.path) or "the top level"


def _linen_collections(module: LinenSpectralNorm, variables: Any) -> Tuple[Mapping[str, Any], Mapping[str, Any]]:
    """``(params, batch_stats)`` of a wrapper's variables, checked (batch_stats is empty for a 1-D weight)."""
    original, u_name, v_name = _state_names(module._spec(), module.param_name)
    params = variables.get("params") if isinstance(variables, Mapping) else None
    if not isinstance(params, Mapping) or original not in params:
        raise MissingParameterError(
            f"the variables given have no param {original!r}; pass the variables of the wrapped module itself "
            f"(what its init returned, params and {STATE_COLLECTION})."
        )
    stats = variables.get(STATE_COLLECTION, {})
    has_state = isinstance(stats, Mapping) and u_name in stats and v_name in stats
    if jnp.ndim(partitioning.unbox(params[original])) > 1 and not has_state:
        raise MissingParameterError(
            f"the variables given have no {STATE_COLLECTION} {u_name!r}/{v_name!r}: pass every collection the "
            "wrapper's init returned, not only 'params'."
        )
    return params, stats


def _linen_use(module: LinenSpectralNorm, variables: Any, update_stats: bool):
    """``(w, u, v, params, batch_stats)`` for one use of the wrapper outside ``apply``."""
    params, stats = _linen_collections(module, variables)
    params, stats = partitioning.unbox(dict(params)), partitioning.unbox(dict(stats))
    original, u_name, v_name = _state_names(module._spec(), module.param_name)
    weight = jnp.asarray(params[original])
    axes = matrix_axes(module.layer, module.param_name, module._spec(), weight.ndim)
    u, v = (stats[u_name], stats[v_name]) if weight.ndim > 1 else (None, None)
    iterations = module.n_power_iterations if update_stats else 0
    w, u, v = spectral_weight(weight, u, v, axes, module.eps, iterations)
    return w, u, v, params, stats


def linen_spectral_weight(module: LinenSpectralNorm, variables: Any):
    """The eval-mode weight ``W / sigma`` (stored u and v, no iteration), in Flax's storage layout."""
    return _linen_use(module, variables, update_stats=False)[0]


def wrapped_linen_variables(
    variables: Mapping[str, Any], layer: nn.Module, spec: SpectralNorm, name: str, key: jax.Array
) -> Any:
    """A plain layer's ``{"params": ...}`` as a spectral-norm wrapper's variables: ``name`` renamed
    ``<name>_orig`` (same value), and for a weight of rank > 1 ``batch_stats`` with u and v drawn from
    ``key``. The caller has checked ``variables`` (params only, a floating weight, no reparametrization)."""
    params = variables["params"]
    boxed = params[name]
    weight = jnp.asarray(partitioning.unbox(boxed))
    original, u_name, v_name = _state_names(spec, name)
    axes = matrix_axes(layer, name, spec, weight.ndim)
    out: Dict[str, Any] = {"params": _same_mapping_type(params, _replace_entry(params, name, {original: boxed}))}
    if weight.ndim > 1:
        u, v = initial_state(weight, key, axes, spec.eps)
        u_names, v_names = state_partitioning(axes)
        u, v = partitioning.linen_boxed(boxed, u, u_names), partitioning.linen_boxed(boxed, v, v_names)
        out[STATE_COLLECTION] = _same_mapping_type(params, {u_name: u, v_name: v})
    return _same_mapping_type(variables, out)


def remove_linen(module: LinenSpectralNorm, variables: Any, update_stats: bool) -> Tuple[nn.Module, Any]:
    """``(plain layer, plain variables)``: ``<name>_orig`` replaced by ``w`` under ``name`` (after
    ``n_power_iterations`` iterations when ``update_stats``), u and v dropped from ``batch_stats`` (and
    the collection with them when nothing else is left in it); other collections are kept."""
    w = _linen_use(module, variables, update_stats)[0]
    original, u_name, v_name = _state_names(module._spec(), module.param_name)
    return plain_linen_variables(module, variables, w, original, (u_name, v_name))


def plain_linen_variables(module: nn.Module, variables: Any, w, original: str,
                          state_names: Tuple[str, ...]) -> Tuple[nn.Module, Any]:
    """What removing a linen wrapper of any reparametrization with ``<name>_orig`` gives: ``(a clone of the
    plain layer, its variables)``, ``original`` replaced by ``w`` under the wrapper's ``param_name``, the
    ``state_names`` dropped from ``batch_stats`` (and the collection with them when nothing else is left
    in it); other collections kept, every mapping of the type it had."""
    out: Dict[str, Any] = {}
    for collection, values in variables.items():
        if collection == "params":
            # w in the box of <name>_orig (the weight's layout): the plain kernel gets its partitioning back
            w_boxed = partitioning.linen_reboxed(values[original], w)
            out["params"] = _same_mapping_type(values, _replace_entry(values, original, {module.param_name: w_boxed}))
        elif collection == STATE_COLLECTION:
            rest = {key: value for key, value in values.items() if key not in state_names}
            if rest:
                out[collection] = _same_mapping_type(values, rest)
        else:
            out[collection] = values
    return module.layer.clone(), _same_mapping_type(variables, out)


# ------------------------------------------------------------------------------------------------
# NNX
# ------------------------------------------------------------------------------------------------
class NNXSpectralNorm(NNXLayerCopy):
    """An NNX module computing a copy of ``layer`` with its parameter ``name`` spectral-normalized.

    Built by :func:`xnorm.wrap`. Its state: ``<name>_orig`` (``nnx.Param``, W in Flax's layout),
    ``<name>_u`` (h,) and ``<name>_v`` (w,) (``nnx.BatchStat``, compute dtype; absent for a 1-D
    weight) and copies of the layer's other top-level variables under their own names (the wrapped
    layer is never read again nor written). u and v are drawn from ``key`` and iterated 15 times.

    ``use_running_average`` is the mode: ``False`` (as built, and after ``train()``) makes every call
    and :func:`xnorm.remove` iterate ``n_power_iterations`` times first and store u and v; ``True``
    (after ``eval()``, or ``nnx.view(model, use_running_average=True)``) never iterates.
    """

    def __init__(self, layer: nnx.Module, *, name: str, spec: SpectralNorm, key: jax.Array):
        graphdef, state = nnx.split(nnx.clone(layer))
        weight = state[name].get_value()
        original, u_name, v_name = _state_names(spec, name)
        self._xnorm_graphdef = graphdef
        self._xnorm_name = name
        self._xnorm_names = (original, u_name, v_name)
        self._xnorm_spec = spec
        self._xnorm_axes = matrix_axes(layer, name, spec, weight.ndim)
        self._xnorm_layer_type = type(layer)
        self._xnorm_others = tuple(other for other in state if other != name)
        self._xnorm_layout = original
        self.use_running_average = False
        kernel = state[name]
        setattr(self, original, partitioning.nnx_variable(kernel, weight, nnx.Param))
        if weight.ndim > 1:
            u, v = initial_state(weight, key, self._xnorm_axes, spec.eps)
            u_names, v_names = state_partitioning(self._xnorm_axes)
            setattr(self, u_name, partitioning.nnx_variable(kernel, u, nnx.BatchStat, u_names))
            setattr(self, v_name, partitioning.nnx_variable(kernel, v, nnx.BatchStat, v_names))
        for other in self._xnorm_others:
            setattr(self, other, state[other])

    def set_view(self, use_running_average: Optional[bool] = None) -> None:
        """Used by ``nnx.view``: ``use_running_average=True`` is eval mode (no power iteration)."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def _use(self, iterations: int):
        """``w`` after ``iterations`` power iterations, storing u and v when it iterated."""
        original, u_name, v_name = self._xnorm_names
        weight = getattr(self, original).get_value()
        has_state = weight.ndim > 1
        u = getattr(self, u_name).get_value() if has_state else None
        v = getattr(self, v_name).get_value() if has_state else None
        w, u, v = spectral_weight(weight, u, v, self._xnorm_axes, self._xnorm_spec.eps, iterations)
        if has_state and iterations:
            getattr(self, u_name).set_value(u)
            getattr(self, v_name).set_value(v)
        return w

    def _mode_iterations(self) -> int:
        return 0 if self.use_running_average else self._xnorm_spec.n_power_iterations

    def weight(self):
        """The eval-mode weight ``W / sigma`` with the stored u and v, in Flax's storage layout. Never
        iterates, whatever the mode, and changes nothing."""
        return self._use(0)

    def __call__(self, *args, **kwargs):
        return self._layer_with(self._use(self._mode_iterations()), share=True)(*args, **kwargs)

    def to_plain(self) -> nnx.Module:
        """A new plain layer (the wrapped layer's class) holding ``w`` and copies of the rest; in training
        mode u and v are iterated (and stored) first, as a training-mode use would."""
        return self._layer_with(self._use(self._mode_iterations()), share=False)
