"""The orthogonal parametrization for the Flax backend: ``xnorm.orthogonal(layer, ...)`` on linen and NNX.

The wrappers compute the layer with ``w = [base @] map(original)`` in place of its weight, as
:class:`xnorm.spec.Orthogonal` and :mod:`xnorm.reference_orthogonal` define it (torch's
``parametrizations.orthogonal``):

* **Layouts.** The map works on the weight's *canonical* (torch) view: a ``Dense`` kernel ``(in, out)``
  is torch's ``(out, in)`` transposed, a ``Conv`` kernel ``(*k, in/groups, out)`` is torch's
  ``(out, in/groups, *k)`` permuted (``storage_layout``, the table of the package docstring). That view
  is a batch of matrices over its **last two axes**: a Conv2d kernel is ``out * in`` matrices of
  ``kh x kw``, each made orthogonal, not the ``(out, in*kh*kw)`` matrix. A wide matrix (n < k) is
  transposed, so every map sees a tall ``(n, k)`` one. The result is laid back into Flax's storage
  layout and used as the layer's kernel.
* **Maps.** ``matrix_exp``: ``expm(A)``, ``cayley``: ``solve(I - A/2, I + A/2)``, with ``A = T - T^T``,
  ``T`` the lower triangle padded with zero columns to ``n x n``, first k columns kept;
  ``householder``: the product of the reflectors below the diagonal (``tau = 2 / (1 + ||a||^2)``) in
  compact WY form (``jax.lax.linalg.householder_product`` has no derivative), each column times the
  integer part of the diagonal entry (not differentiated). Default: ``matrix_exp`` for square
  matrices, else ``householder``.
* **Parameters.** ``<name>_orig`` (``kernel_orig``): trainable (linen ``params``, ``nnx.Param``), in
  Flax's storage layout and the weight's dtype; the layer's other parameters keep their names.
* **State.** With ``use_trivialization`` (the default), ``<name>_base``: ``batch + (n, n)`` with n the
  larger of the last two canonical axes, in the **canonical** layout (like spectral norm's u and v), in
  the compute dtype (the weight's; float32 for float16/bfloat16 weights), outside the trainable
  parameters: linen ``batch_stats``, NNX ``nnx.BatchStat``. It never changes after registration, so a
  call only reads it (no ``update_stats``, no mutable collection); no gradient flows into it. Absent
  without trivialization.
* **Registration** (:func:`register`, torch's ``right_inverse``). Trivialized: ``original = -I`` (the
  ``min(n, k)`` diagonal of every matrix, storage layout) so that every map gives ``I``; ``base`` is the
  tall weight itself when square and orthogonal (``allclose(Q^T Q, I, rtol=1e-5, atol=10 n eps)`` over
  the whole batch, torch's test), else the Q of its QR with ``diag(R) >= 0``, a non-square weight first
  completed to ``n x n`` with N(0, 1) columns ``batch + (n, n - k)`` drawn from a JAX key. So wrapping
  changes the weight unless it is already orthogonal. Without trivialization ``matrix_exp`` and
  ``cayley`` keep the weight as ``original`` (the layer then computes its map), ``householder`` stores
  the reflectors of the weight's QR (LAPACK's geqrf layout, the diagonal set to the signs, flipped where
  ``tau == 0``), so the layer computes its QR's Q. Flax has no weight assignment, so torch's refusal to
  assign a weight to a direct ``matrix_exp``/``cayley`` has no counterpart here.
* **RNG.** The completion is the only draw: linen ``init`` takes it from its ``params`` rng;
  ``xnorm.wrap(..., variables=...)`` (linen) and NNX from ``rngs=`` (an ``nnx.Rngs``, its ``params``
  stream; a JAX key; an int seed), required only when a draw is needed (trivialized, non-square).

Failure modes, raised before anything is drawn or built (the layer and its variables are left as they
were): DimError (a weight with fewer than 2 axes), OptionError (an unknown map, from the spec; a missing
or bad ``rngs=``), NonFloatingParameterError (integer and complex weights, so householder never sees a
complex one), AlreadyWrappedError (the package's checks). Removal materializes ``w`` once and returns
the plain layer (linen: with its variables, ``base`` dropped from ``batch_stats``).
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from xnorm.errors import MissingParameterError, OptionError
from xnorm.spec import Orthogonal

from . import NNXLayerCopy, _replace_entry, _same_mapping_type, linen_initial_params, partitioning, storage_layout
from .spectral import STATE_COLLECTION, _work_dtype, draw_key, plain_linen_variables

__all__ = [
    "LinenOrthogonal",
    "NNXOrthogonal",
    "orthogonal_weight",
    "register",
    "linen_orthogonal_weight",
    "completion_key",
]


# ------------------------------------------------------------------------------------------------
# The math, on the canonical view
# ------------------------------------------------------------------------------------------------
def layout_perm(layer: Any, name: str, ndim: int) -> Tuple[int, ...]:
    """``perm`` of the storage layout: ``jnp.transpose(canonical, perm)`` is the storage layout."""
    return storage_layout(layer, name, ndim).perm


def canonical_shape(layer: Any, name: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The shape of torch's view of a weight Flax stores with ``shape``: the map's default, the rank check
    and whether a completion is drawn are read from it (a Conv kernel ``(3, 3, 2, 4)`` is ``(4, 2, 3, 3)``,
    a batch of square matrices, whereas its storage's last two axes are not square)."""
    return storage_layout(layer, name, len(shape)).canonical_shape(shape)


def _to_canonical(weight, perm: Tuple[int, ...]):
    return jnp.transpose(weight, tuple(perm.index(axis) for axis in range(len(perm))))


def _eye_columns(n: int, k: int, dtype):
    return jnp.eye(n, k, dtype=dtype)


def _householder(X):
    """``H_1 ... H_k [:, :k]`` for the reflectors below the diagonal of tall ``X`` ``(..., n, k)``, in
    compact WY form: ``I - V T V^T`` with ``T^{-1} = diag(1/tau) + triu(V^T V, 1)``."""
    n, k = X.shape[-2:]
    below = jnp.tril(X, -1)
    V = below + _eye_columns(n, k, X.dtype)
    tau = 2.0 / (1.0 + jnp.sum(below * below, axis=-2))
    Vt = jnp.swapaxes(V, -1, -2)
    t_inverse = jnp.triu(Vt @ V, 1) + (1.0 / tau)[..., :, None] * jnp.eye(k, dtype=X.dtype)
    Q = _eye_columns(n, k, X.dtype) - V @ jax.scipy.linalg.solve_triangular(
        t_inverse, jnp.swapaxes(V[..., :k, :], -1, -2), lower=False
    )
    # the diagonal holds each column's sign, read as an integer (torch's .int()) and never differentiated
    signs = jax.lax.stop_gradient(jnp.trunc(jnp.diagonal(X, axis1=-2, axis2=-1)))
    return Q * signs[..., None, :]


def _skew(X, n: int):
    """``T - T^T`` with ``T = tril(X)`` padded with zero columns to ``n x n`` (X tall)."""
    T = jnp.tril(X)
    k = X.shape[-1]
    if k != n:
        T = jnp.concatenate([T, jnp.zeros(X.shape[:-2] + (n, n - k), X.dtype)], axis=-1)
    return T - jnp.swapaxes(T, -1, -2)


def _map(X, orthogonal_map: str):
    """The map's result for tall ``X`` ``(..., n, k)``: ``(..., n, k)`` with orthonormal columns."""
    n, k = X.shape[-2:]
    if orthogonal_map == "householder":
        return _householder(X)
    A = _skew(X, n)
    if orthogonal_map == "matrix_exp":
        Q = jax.scipy.linalg.expm(A)
    else:
        eye = jnp.eye(n, dtype=X.dtype)
        Q = jnp.linalg.solve(eye - A / 2, eye + A / 2)
    return Q[..., :k]


def orthogonal_weight(original, base, perm: Tuple[int, ...], orthogonal_map: str):
    """:func:`_orthogonal_weight`, with Explicit mesh axes made Auto for it (:func:`.partitioning.auto_axes_call`)."""
    return partitioning.auto_axes_call(
        lambda original, base: _orthogonal_weight(original, base, perm, orthogonal_map),
        (original, base), original, (None,),
    )


# jit: one program per shape where this runs eagerly (the weight outside apply, NNX's to_plain)
@functools.partial(jax.jit, static_argnames=("perm", "orthogonal_map"))
def _orthogonal_weight(original, base, perm: Tuple[int, ...], orthogonal_map: str):
    """``w`` in Flax's storage layout and the weight's dtype, from ``original`` (storage layout) and
    ``base`` (canonical, or None without trivialization); computed in the compute dtype."""
    work = _work_dtype(original.dtype)
    X = _to_canonical(original.astype(work), perm)
    transposed = X.shape[-2] < X.shape[-1]
    if transposed:
        X = jnp.swapaxes(X, -1, -2)
    Q = _map(X, orthogonal_map)
    if base is not None:
        Q = jax.lax.stop_gradient(base.astype(work)) @ Q
    if transposed:
        Q = jnp.swapaxes(Q, -1, -2)
    return jnp.transpose(Q, perm).astype(original.dtype)


def _make_orthogonal(A):
    """The Q of ``A = QR`` (``A`` tall) with ``diag(R) >= 0``; a zero on R's diagonal zeroes its column."""
    q, r = jnp.linalg.qr(A)
    return q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[..., None, :]


def _is_orthogonal(Q):
    """torch's test: ``allclose(Q^T Q, I, rtol=1e-5, atol=10 n eps)`` over the whole batch (a traced bool)."""
    n, k = Q.shape[-2:]
    eye = jnp.eye(k, dtype=Q.dtype)
    atol = 10.0 * n * jnp.finfo(Q.dtype).eps
    return jnp.all(jnp.abs(jnp.swapaxes(Q, -1, -2) @ Q - eye) <= atol + 1e-5 * jnp.abs(eye))


def _reflectors(Q):
    """torch's ``right_inverse`` without trivialization for householder: geqrf's reflectors with the
    diagonal set to the signs of R's, flipped where LAPACK used no reflection (``tau == 0``)."""
    h, tau = jnp.linalg.qr(Q, mode="raw")  # NumPy's layout: h is geqrf's output transposed
    A = jnp.swapaxes(h, -1, -2)
    diagonal = jnp.sign(jnp.diagonal(A, axis1=-2, axis2=-1))
    diagonal = jnp.where(tau == 0.0, -diagonal, diagonal)
    k = A.shape[-1]
    index = jnp.arange(k)
    return A.at[..., index, index].set(diagonal)


def needs_draw(spec: Orthogonal, shape: Tuple[int, ...]) -> bool:
    """True when registering a weight of canonical ``shape`` draws random columns (trivialized, non-square)."""
    return spec.use_trivialization and shape[-1] != shape[-2]


def register(weight, key, perm: Tuple[int, ...], orthogonal_map: str, use_trivialization: bool,
             base_names: partitioning.Mapping = None):
    """:func:`_register`, with Explicit mesh axes made Auto for it (:func:`.partitioning.auto_axes_call`);
    ``base_names`` is :func:`base_partitioning` of the weight (needed only when it is sharded that way)."""
    def run(weight, key):
        return _register(weight, key, perm, orthogonal_map, use_trivialization)

    if not use_trivialization:  # no base: one output
        original = partitioning.auto_axes_call(lambda weight, key: run(weight, key)[0], (weight, key), weight, (None,))
        return original, None
    base_names = base_names or (lambda names: ())
    return partitioning.auto_axes_call(run, (weight, key), weight, (None, base_names))


@functools.partial(jax.jit, static_argnames=("perm", "orthogonal_map", "use_trivialization"))
def _register(weight, key, perm: Tuple[int, ...], orthogonal_map: str, use_trivialization: bool):
    """``(original, base)`` after registering ``weight`` (storage layout): ``original`` in storage layout
    and the weight's dtype, ``base`` canonical in the compute dtype (None without trivialization).
    ``key`` draws the completion of a non-square weight (None where :func:`needs_draw` is False)."""
    work = _work_dtype(weight.dtype)
    X = _to_canonical(weight.astype(work), perm)
    transposed = X.shape[-2] < X.shape[-1]
    Q = jnp.swapaxes(X, -1, -2) if transposed else X
    n, k = Q.shape[-2:]
    if not use_trivialization:
        if orthogonal_map != "householder":
            return weight, None
        A = _reflectors(Q)
        A = jnp.swapaxes(A, -1, -2) if transposed else A
        return jnp.transpose(A, perm).astype(weight.dtype), None
    if n == k:
        base = jnp.where(_is_orthogonal(Q), Q, _make_orthogonal(Q))
    else:
        completion = jax.random.normal(key, Q.shape[:-2] + (n, n - k), work)
        base = _make_orthogonal(jnp.concatenate([Q, completion], axis=-1))
    rows, columns = X.shape[-2:]
    minus_eye = jnp.broadcast_to(-jnp.eye(rows, columns, dtype=weight.dtype), X.shape)
    return jnp.transpose(minus_eye, perm), base


def completion_key(spec: Orthogonal, shape: Tuple[int, ...], rngs: Any) -> Optional[jax.Array]:
    """The JAX key the completion of a weight of canonical ``shape`` is drawn from, or None when nothing is drawn.
    ``rngs`` is what the user passed (None when nothing was)."""
    if not needs_draw(spec, shape):
        return None
    if rngs is None:
        raise OptionError(
            f"the orthogonal parametrization completes the non-square weight (torch's shape {tuple(shape)}) with "
            "random columns at wrap: pass rngs= (an nnx.Rngs, as Flax layers take it, a JAX key such as "
            "jax.random.key(0), or an int seed)."
        )
    try:
        return draw_key(rngs)
    except OptionError:
        raise OptionError(
            f"rngs must be an nnx.Rngs, a JAX key (jax.random.key(0)) or an int seed, got {type(rngs).__name__}: "
            "the orthogonal parametrization draws the columns completing a non-square weight from it."
        ) from None


def base_partitioning(layer: Any, name: str, shape: Tuple[int, ...]) -> partitioning.Mapping:
    """How ``<name>_base`` takes the partitioning names of a weight Flax stores with ``shape``
    (:mod:`.partitioning`): its batch axes those of the canonical batch axes, its rows those of the
    larger matrix axis (the one ``base @ Q`` produces, so w's rows stay where the weight had them)."""
    layout = storage_layout(layer, name, len(shape))
    canonical = layout.canonical_shape(shape)
    rank = len(shape)
    rows = rank - 2 if canonical[-2] >= canonical[-1] else rank - 1
    return partitioning.orthogonal_base(
        [layout.storage_axis(axis) for axis in range(rank - 2)], layout.storage_axis(rows)
    )


def _names(spec: Orthogonal, name: str) -> Tuple[str, str]:
    """``(<name>_orig, <name>_base)``."""
    (original,) = spec.tensor_names(name)
    (base,) = spec.state_names(name)
    return original, base


# ------------------------------------------------------------------------------------------------
# linen
# ------------------------------------------------------------------------------------------------
class LinenOrthogonal(nn.Module):
    """A linen module computing ``layer`` with its parameter ``param_name`` orthogonal.

    Attributes:
        layer: the wrapped linen module, only ever run through an unbound copy (``layer.clone().apply``).
        param_name: the wrapped parameter (``"kernel"``).
        orthogonal_map, use_trivialization: :class:`xnorm.spec.Orthogonal`'s options.

    Variables: ``params`` holds ``<param_name>_orig`` (storage shape and dtype) and the layer's other
    parameters; with trivialization ``batch_stats`` holds ``<param_name>_base`` (canonical,
    ``batch + (n, n)``), read-only after ``init``. ``init`` registers the layer's own initial weight
    (module docstring), drawing the completion of a non-square weight from its ``params`` rng.

    Call: ``wrapper.apply(variables, *args, **kwargs)`` with every collection ``init`` returned; the
    arguments go to the layer. No mode, nothing mutable.

    Raises (at ``init``, for a layer whose weight's rank is only known then): DimError,
    MissingParameterError, NonFloatingParameterError, UnsupportedLayerError.
    """

    layer: nn.Module
    param_name: str = "kernel"
    orthogonal_map: Optional[str] = None
    use_trivialization: bool = True

    def _spec(self) -> Orthogonal:
        return Orthogonal(orthogonal_map=self.orthogonal_map, use_trivialization=self.use_trivialization)

    @nn.compact
    def __call__(self, *args, **kwargs):
        from .linen_model import plain_call, plain_wrappers

        if plain_wrappers():  # inside the plain view xnorm.remove returns for a whole model: no state
            return plain_call(self, args, kwargs)
        spec = self._spec()
        original, base_name = _names(spec, self.param_name)
        template = self.layer.clone()  # unbound: it reads w from us, never from a scope of its own
        if not self.has_variable("params", original) and self.is_mutable_collection("params"):
            initial = linen_initial_params(self, template, args, kwargs)
            boxed = initial[self.param_name]
            weight = partitioning.unbox(boxed)
            shape = canonical_shape(self.layer, self.param_name, weight.shape)
            orthogonal_map = spec.resolved_map(shape)  # DimError for a 1-D weight
            perm = layout_perm(self.layer, self.param_name, weight.ndim)
            draw = self.make_rng("params") if needs_draw(spec, shape) else None
            base_names = base_partitioning(self.layer, self.param_name, weight.shape)
            original0, base0 = register(weight, draw, perm, orthogonal_map, spec.use_trivialization, base_names)
            original0 = partitioning.linen_boxed(boxed, original0)
            initial = _replace_entry(initial, self.param_name, {original: original0})
            values = {key: self.param(key, lambda _, value=value: value) for key, value in initial.items()}
            if base0 is not None:
                base0 = partitioning.linen_boxed(boxed, base0, base_names)
                self.variable(STATE_COLLECTION, base_name, lambda: base0)
        else:
            # Read directly: self.param would re-run an init function under eval_shape (there is none).
            values = partitioning.unbox(dict(self.variables.get("params", {})))
            if original not in values:
                raise MissingParameterError(
                    f"no param {original!r} at {self._path()}; pass the variables this wrapper's init returned "
                    "(or xnorm.wrap(..., variables=...)'s)."
                )
        weight = values.pop(original)
        base = None
        if spec.use_trivialization:
            if not self.has_variable(STATE_COLLECTION, base_name):
                raise MissingParameterError(
                    f"no {STATE_COLLECTION} {base_name!r} at {self._path()}: the orthogonal parametrization's base "
                    f"lives in '{STATE_COLLECTION}'. Pass every collection init returned, not only 'params'."
                )
            base = partitioning.unbox(self.get_variable(STATE_COLLECTION, base_name))
        perm = layout_perm(self.layer, self.param_name, weight.ndim)
        orthogonal_map = spec.resolved_map(canonical_shape(self.layer, self.param_name, weight.shape))
        values[self.param_name] = orthogonal_weight(weight, base, perm, orthogonal_map)
        return template.apply({"params": values}, *args, **kwargs)

    def _path(self) -> str:
        return "/".join(self.scope.path) or "the top level"


def linen_orthogonal_weight(module: LinenOrthogonal, variables: Any):
    """``w`` in Flax's storage layout from a wrapper's variables (``params`` and, trivialized, ``batch_stats``)."""
    spec = module._spec()
    original, base_name = _names(spec, module.param_name)
    params = variables.get("params") if isinstance(variables, Mapping) else None
    if not isinstance(params, Mapping) or original not in params:
        raise MissingParameterError(
            f"the variables given have no param {original!r}; pass the variables of the wrapped module itself "
            f"(what its init returned, params and {STATE_COLLECTION})."
        )
    stats = variables.get(STATE_COLLECTION, {})
    if spec.use_trivialization and not (isinstance(stats, Mapping) and base_name in stats):
        raise MissingParameterError(
            f"the variables given have no {STATE_COLLECTION} {base_name!r}: pass every collection the wrapper's "
            "init returned, not only 'params'."
        )
    weight = jnp.asarray(partitioning.unbox(params[original]))
    base = jnp.asarray(partitioning.unbox(stats[base_name])) if spec.use_trivialization else None
    perm = layout_perm(module.layer, module.param_name, weight.ndim)
    orthogonal_map = spec.resolved_map(canonical_shape(module.layer, module.param_name, weight.shape))
    return orthogonal_weight(weight, base, perm, orthogonal_map)


def wrapped_linen_variables(
    variables: Mapping[str, Any], layer: nn.Module, spec: Orthogonal, name: str, rngs: Any
) -> Any:
    """A plain layer's ``{"params": ...}`` registered: ``name`` replaced by ``<name>_orig`` and, trivialized,
    ``batch_stats`` with ``<name>_base``. The caller has checked ``variables`` (params only, a floating
    weight, no reparametrization); this checks the rank and ``rngs`` before computing anything."""
    params = variables["params"]
    boxed = params[name]
    weight = jnp.asarray(partitioning.unbox(boxed))
    shape = canonical_shape(layer, name, weight.shape)
    orthogonal_map = spec.resolved_map(shape)
    key = completion_key(spec, shape, rngs)
    original0, base0 = register(weight, key, layout_perm(layer, name, weight.ndim), orthogonal_map,
                                spec.use_trivialization, base_partitioning(layer, name, weight.shape))
    original, base_name = _names(spec, name)
    original0 = partitioning.linen_boxed(boxed, original0)
    out: Dict[str, Any] = {"params": _same_mapping_type(params, _replace_entry(params, name, {original: original0}))}
    if base0 is not None:
        base0 = partitioning.linen_boxed(boxed, base0, base_partitioning(layer, name, weight.shape))
        out[STATE_COLLECTION] = _same_mapping_type(params, {base_name: base0})
    return _same_mapping_type(variables, out)


def remove_linen(module: LinenOrthogonal, variables: Any) -> Tuple[nn.Module, Any]:
    """``(plain layer, plain variables)``: ``<name>_orig`` replaced by ``w`` under ``name``, ``base`` dropped
    from ``batch_stats`` (the collection with it when nothing else is left); other collections kept."""
    w = linen_orthogonal_weight(module, variables)
    original, base_name = _names(module._spec(), module.param_name)
    return plain_linen_variables(module, variables, w, original, (base_name,))


# ------------------------------------------------------------------------------------------------
# NNX
# ------------------------------------------------------------------------------------------------
class NNXOrthogonal(NNXLayerCopy):
    """An NNX module computing a copy of ``layer`` with its parameter ``name`` orthogonal.

    Built by :func:`xnorm.wrap` from the layer's current weight (the layer is left as it was). Its state:
    ``<name>_orig`` (``nnx.Param``, storage layout), with trivialization ``<name>_base`` (``nnx.BatchStat``,
    canonical; ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` does not train it, and no call writes it) and
    copies of the layer's other top-level variables. ``key`` draws the completion of a non-square
    weight (None when nothing is drawn). There is no mode: ``train()``/``eval()`` change nothing here.
    """

    def __init__(self, layer: nnx.Module, *, name: str, spec: Orthogonal, key: Optional[jax.Array]):
        graphdef, state = nnx.split(nnx.clone(layer))
        weight = state[name].get_value()
        original, base_name = _names(spec, name)
        self._xnorm_graphdef = graphdef
        self._xnorm_name = name
        self._xnorm_names = (original, base_name)
        self._xnorm_spec = spec
        self._xnorm_map = spec.resolved_map(canonical_shape(layer, name, weight.shape))
        self._xnorm_perm = layout_perm(layer, name, weight.ndim)
        self._xnorm_layer_type = type(layer)
        self._xnorm_others = tuple(other for other in state if other != name)
        self._xnorm_layout = original
        original0, base0 = register(weight, key, self._xnorm_perm, self._xnorm_map, spec.use_trivialization,
                                    base_partitioning(layer, name, weight.shape))
        kernel = state[name]
        setattr(self, original, partitioning.nnx_variable(kernel, original0, nnx.Param))
        if base0 is not None:
            base_names = base_partitioning(layer, name, weight.shape)
            setattr(self, base_name, partitioning.nnx_variable(kernel, base0, nnx.BatchStat, base_names))
        for other in self._xnorm_others:
            setattr(self, other, state[other])

    def weight(self):
        """``w``, the weight the wrapper computes with, in Flax's storage layout."""
        original, base_name = self._xnorm_names
        base = getattr(self, base_name).get_value() if self._xnorm_spec.use_trivialization else None
        return orthogonal_weight(getattr(self, original).get_value(), base, self._xnorm_perm, self._xnorm_map)

    def __call__(self, *args, **kwargs):
        return self._layer_with(self.weight(), share=True)(*args, **kwargs)

    def to_plain(self) -> nnx.Module:
        """A new plain layer (the wrapped layer's class) holding ``w`` and copies of the rest."""
        return self._layer_with(self.weight(), share=False)


def wrap_nnx(layer: nnx.Module, name: str, spec: Orthogonal, weight, rngs: Any) -> NNXOrthogonal:
    """The NNX wrapper; the rank and ``rngs`` are checked before anything is built or drawn."""
    shape = canonical_shape(layer, name, weight.shape)
    spec.resolved_map(shape)
    key = completion_key(spec, shape, rngs)
    return NNXOrthogonal(layer, name=name, spec=spec, key=key)
