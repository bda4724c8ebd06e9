"""The Flax backend: weight normalization (here), spectral normalization (:mod:`.spectral`) and the
orthogonal parametrization (:mod:`.orthogonal`) for ``flax.linen`` and ``flax.nnx`` modules.

``xnorm.wrap(layer, backend="flax", dim=0)`` returns a new module that computes::

    w = v * (g / norm_except_dim(v, dim))

and calls the wrapped layer with ``w`` in place of its weight (see :mod:`xnorm.spec`). g starts at
the weight's norm and v at the weight, so wrapping never changes what the layer computes.

Parameter naming rule (the same as torch's ``weight_g``/``weight_v``): the wrapped parameter ``name``
(``"kernel"`` by default, ``"embedding"`` for ``Embed``) is replaced by ``name + "_g"`` and
``name + "_v"``; every other parameter of the layer (``bias``...) keeps its name. All of them live at
the wrapper's own scope, which takes the wrapped layer's place:

* linen: a wrapped ``Dense`` has ``{"params": {"kernel_g", "kernel_v", "bias"}}``; inside a model the
  wrapper sits at the layer's own path (``params["Dense_0"]``, ``params["fc"]``).
* NNX: the wrapper's state is ``{kernel_g, kernel_v, bias}``; ``model.fc = xnorm.wrap(model.fc)`` gives
  ``fc.kernel_g``, ``fc.kernel_v``, ``fc.bias``.

``dim`` is read in the canonical (torch) layout and mapped to Flax's storage layout:

==========================================  =====================  ================================
layer                                       Flax kernel            canonical (torch) layout
==========================================  =====================  ================================
``Dense`` / ``nnx.Linear``                  ``(in, out)``          ``(out, in)``
``Conv`` / ``nnx.Conv``                     ``(*k, in/groups, out)``  ``(out, in/groups, *k)``
``ConvTranspose``                           ``(*k, in, out)``      ``(in, out, *k)``
``ConvTranspose(transpose_kernel=True)``    ``(*k, out, in)``      ``(in, out, *k)``
``Embed`` / ``nnx.Embed`` (``embedding``)   ``(num, features)``    ``(num, features)``
any other module or parameter               its own axes           its own axes
==========================================  =====================  ================================

g keeps the storage layout with every axis but ``dim``'s reduced to size 1 (a 0-d scalar for
``dim=None``/``-1``).

Wrapping never writes into the wrapped layer: the linen wrapper calls an unbound copy of the layer
with ``w`` through ``Module.apply``; the NNX wrapper keeps its own copies of the layer's variables
and, on each call, builds a throw-away layer from the layer's ``GraphDef`` with ``w`` as its kernel
(:class:`NNXLayerCopy`). The spectral-norm wrappers work the same way, with ``<name>_orig`` and the
state ``<name>_u``, ``<name>_v`` instead of g and v.

Partitioning: every tensor derived from the weight carries the weight's sharding annotation (NNX
``out_sharding`` metadata, linen ``nn.Partitioned`` boxes) mapped to its own axes, so sharding rules
written for the plain layer apply to the wrapped one (:mod:`.partitioning`).
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax.core import FrozenDict
from flax.core.scope import Scope

from xnorm import api
from xnorm.errors import (
    AlreadyWrappedError,
    MissingParameterError,
    OptionError,
    UnsupportedLayerError,
)
from xnorm.registry import Backend
from xnorm.spec import (
    REPARAMETRIZATIONS,
    LayerKind,
    Orthogonal,
    Reparametrization,
    SpectralNorm,
    StorageLayout,
    WeightNorm,
    check_floating,
    check_fused_option,
    check_fused_spec,
)

from . import partitioning

__all__ = [
    "FlaxBackend",
    "LinenWeightNorm",
    "NNXWeightNorm",
    "NNXLayerCopy",
    "linen_initial_params",
    "storage_layout",
    "linen_weight",
]

_LOW_PRECISION = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
_MISSING = object()

#: Refused by ``wrap`` whatever ``name=``: their parameter is a per-feature scale, not a weight matrix, and
#: torch and MindSpore refuse them too (docs/spec.md, "Supported layers and errors"); a BatchNorm's
#: statistics are ``xnorm.freeze``'s business.
NORMALIZATION_LAYERS: Tuple[type, ...] = tuple(
    getattr(namespace, cls)
    for namespace in (nn, nnx)
    for cls in ("BatchNorm", "LayerNorm", "GroupNorm", "RMSNorm", "InstanceNorm")
    if isinstance(getattr(namespace, cls, None), type)
)


def _no_own_parameters(layer: Any, children: Sequence[str] = ()) -> UnsupportedLayerError:
    """The error for a layer with nothing to reparametrize, the class torch and MindSpore give too."""
    where = f" (its sub-modules {', '.join(map(str, children))} do)" if children else ""
    return UnsupportedLayerError(
        f"the flax backend cannot reparametrize a {type(layer).__module__}.{type(layer).__qualname__}: it holds no "
        f"parameter of its own{where}. Wrap the sub-module that owns the weight."
    )


# ------------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------------
def _kind(layer: Any, name: str) -> Tuple[str, Optional[int], bool]:
    """``(kind, canonical ndim or None, transpose_kernel)`` of parameter ``name`` of ``layer``.

    The ndim is known before the weight exists for the standard layers (from ``kernel_size``); it is
    None for anything read as ``generic``, whose rank is only known once the parameter exists.
    """
    if isinstance(layer, (nn.Dense, nnx.Linear)) and name == "kernel":
        return LayerKind.LINEAR, 2, False
    if isinstance(layer, (nn.Embed, nnx.Embed)) and name == "embedding":
        return LayerKind.EMBEDDING, 2, False
    conv = isinstance(layer, (nn.Conv, nnx.Conv))  # nn.ConvLocal is not an nn.Conv: its kernel is unshared
    transpose = isinstance(layer, (nn.ConvTranspose, nnx.ConvTranspose))
    if (conv or transpose) and name == "kernel":
        size = layer.kernel_size
        n = 1 if isinstance(size, int) else len(size)
        prefix = "conv" if conv else "conv_transpose"
        return f"{prefix}{n}d", n + 2, bool(transpose and layer.transpose_kernel)
    return LayerKind.GENERIC, None, False


def storage_layout(layer: Any, name: str, ndim: int) -> StorageLayout:
    """How Flax stores parameter ``name`` (of rank ``ndim``) of ``layer`` relative to torch's layout.

    See the module docstring's table. A parameter xnorm has no canonical layout for (a custom module,
    ``DenseGeneral``, a bias...) is read in its own axes (identity layout).
    """
    kind, _, transpose_kernel = _kind(layer, name)
    if kind == LayerKind.LINEAR:
        return StorageLayout((1, 0))
    spatial = tuple(range(2, ndim))
    if kind.startswith("conv_transpose"):
        # Flax's (*k, in, out); transpose_kernel=True stores the forward conv's (*k, out, in), whose
        # spatial flip is applied by lax.conv_transpose: a flip never changes a norm.
        return StorageLayout(spatial + ((1, 0) if transpose_kernel else (0, 1)))
    if kind.startswith("conv"):
        return StorageLayout(spatial + (1, 0))
    return StorageLayout.identity(ndim)


def _known_ranks(layer: nn.Module) -> Optional[Dict[str, int]]:
    """Parameter name -> rank for the linen layers whose parameters are known before ``init``."""
    kind, ndim, _ = _kind(layer, _default_name(layer))
    if kind == LayerKind.GENERIC:
        return None
    if isinstance(layer, nn.Embed):
        return {"embedding": 2}
    return {"kernel": ndim, **({"bias": 1} if layer.use_bias else {})}


def _default_name(layer: Any) -> str:
    return "embedding" if isinstance(layer, (nn.Embed, nnx.Embed)) else "kernel"


def _resolve(layer: Any, name: str, spec: WeightNorm, ndim: int) -> Tuple[Optional[int], Tuple[int, ...], bool]:
    """``(canonical dim, storage reduction axes, keepdims)``; raises DimError for a bad ``dim``."""
    dim = spec.resolved_dim(ndim)
    layout = storage_layout(layer, name, ndim)
    if dim is None:
        return None, tuple(range(ndim)), False
    return dim, layout.storage_reduction_axes(dim), True


# ------------------------------------------------------------------------------------------------
# The math, in storage layout
# ------------------------------------------------------------------------------------------------
def _norm(v, axes: Tuple[int, ...], keepdims: bool, eps: Optional[float]):
    """sqrt(sum(v**2 over axes) [+ eps]) in float32 for float16/bfloat16, else in v's dtype."""
    work = jnp.float32 if jnp.dtype(v.dtype) in _LOW_PRECISION else v.dtype
    v = v.astype(work)
    squares = jnp.sum(v * v, axis=axes, keepdims=keepdims)
    if eps is not None:
        squares = squares + jnp.asarray(eps, dtype=work)  # a NumPy float64 eps must not promote float32
    return jnp.sqrt(squares)


# _init_g and _materialize run eagerly too (at wrap, and for the weight outside apply): jit makes each
# one XLA program per shape instead of one per operation (four to six small compiles per new shape).
# Inside a trace the nested program is inlined; XLA may then round differently from the op-by-op run
# (within an ulp or two in float32, docs/performance.md).
@functools.partial(jax.jit, static_argnames=("axes", "keepdims", "eps"))
def _init_g(weight, axes: Tuple[int, ...], keepdims: bool, eps: Optional[float]):
    """The function-preserving g: the weight's norm, stored in the weight's dtype."""
    return _norm(weight, axes, keepdims, eps).astype(weight.dtype)


@functools.partial(jax.jit, static_argnames=("axes", "keepdims", "eps"))
def _materialize(g, v, axes: Tuple[int, ...], keepdims: bool, eps: Optional[float]):
    """``w = v * (g / norm)``, in that order, computed in float32 for low precision and cast back once."""
    norm = _norm(v, axes, keepdims, eps)
    w = v.astype(norm.dtype) * (g.astype(norm.dtype) / norm)
    return w.astype(v.dtype)


def _check_weight(value: Any, what: str) -> None:
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise MissingParameterError(
            f"{what} is a {type(value).__name__}, not an array; weight normalization needs an array "
            "parameter. Pass name= to pick the weight."
        )
    check_floating(jnp.dtype(value.dtype).name, what=what)


def _names(spec: WeightNorm, name: str) -> Tuple[str, str]:
    g_name, v_name = spec.tensor_names(name)
    return g_name, v_name


def _replace_entry(params: Mapping[str, Any], name: str, new: Dict[str, Any]) -> Dict[str, Any]:
    """``params`` with entry ``name`` replaced by the entries of ``new``, keeping the order."""
    out: Dict[str, Any] = {}
    for key, value in params.items():
        if key == name:
            out.update(new)
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------------
# linen
# ------------------------------------------------------------------------------------------------
def linen_initial_params(
    wrapper: nn.Module, template: nn.Module, args: tuple, kwargs: Dict[str, Any]
) -> Dict[str, Any]:
    """The wrapped layer's own freshly initialised params, checked, for a linen wrapper's ``init``.

    ``wrapper`` has the fields ``layer`` and ``param_name``; ``template`` is an unbound clone of the
    layer, initialised with the wrapper's ``params`` rng and the call's arguments.
    """
    variables = template.init(wrapper.make_rng("params"), *args, **kwargs)
    layer_type = type(wrapper.layer).__name__
    extra = sorted(set(variables) - {"params"})
    if extra:
        raise UnsupportedLayerError(
            f"{layer_type} creates variables outside 'params' ({', '.join(extra)}); the "
            "linen wrapper only carries 'params'. Wrap the sub-layer that owns the weight instead."
        )
    params = dict(variables.get("params", {}))
    name = wrapper.param_name
    if not params:
        raise _no_own_parameters(wrapper.layer)
    if name not in params:
        raise MissingParameterError(
            f"{layer_type} has no parameter {name!r} (it has: {', '.join(params) or 'none'}). "
            "Pass name= with one of these."
        )
    _check_weight(partitioning.unbox(params[name]), f"parameter {name!r} of {layer_type}")
    return params


class LinenWeightNorm(nn.Module):
    """A linen module computing ``layer`` with its parameter ``param_name`` weight-normalized.

    Attributes:
        layer: the wrapped linen module. It is only ever run through an unbound copy
            (``layer.clone().apply``), so it never owns variables of its own.
        param_name: the wrapped parameter (``"kernel"``; ``"embedding"`` for ``Embed``).
        dim: the axis keeping its own norm, **in torch's layout** (module docstring), ``None``/``-1``
            for one norm over the whole weight.
        eps: ``None``, or a value added to the sum of squares under the square root.

    Variables (``params``): ``<param_name>_g`` (storage layout, every axis but ``dim``'s of size 1,
    0-d for ``dim=None``), ``<param_name>_v`` (the weight's shape) and the layer's other parameters
    under their own names. ``init`` sets v to the layer's own initial weight and g to its norm, so
    ``apply`` computes exactly what the layer would with that weight.

    Raises (at ``init``, for layers whose weight xnorm cannot see before it exists):
        MissingParameterError, NonFloatingParameterError, DimError, UnsupportedLayerError (the layer
        creates variables outside ``params``).
    """

    layer: nn.Module
    param_name: str = "kernel"
    dim: Optional[int] = 0
    eps: Optional[float] = None

    def _spec(self) -> WeightNorm:
        return WeightNorm(dim=self.dim, eps=self.eps)

    @nn.compact
    def __call__(self, *args, **kwargs):
        from .linen_model import plain_call, plain_wrappers

        if plain_wrappers():  # inside the plain view xnorm.remove returns for a whole model
            return plain_call(self, args, kwargs)
        template = self.layer.clone()  # unbound: it reads w from us, never from a scope of its own
        g_name, v_name = _names(self._spec(), self.param_name)
        if not self.has_variable("params", v_name) and self.is_mutable_collection("params"):
            initial = linen_initial_params(self, template, args, kwargs)
            boxed = initial[self.param_name]
            weight = partitioning.unbox(boxed)
            _, axes, keep = _resolve(self.layer, self.param_name, self._spec(), weight.ndim)
            g0 = _init_g(weight, axes, keep, self.eps)
            g0 = partitioning.linen_boxed(boxed, g0, partitioning.kept_axes(axes, keep))
            initial = _replace_entry(initial, self.param_name, {g_name: g0, v_name: boxed})
            values = {key: self.param(key, lambda _, value=value: value) for key, value in initial.items()}
        else:
            # self.param would re-run an init function under eval_shape to check shapes; there is none
            # to run here, so the existing variables are read directly (unboxed: nn.Partitioned...).
            values = partitioning.unbox(dict(self.variables.get("params", {})))
            if g_name not in values or v_name not in values:
                raise MissingParameterError(
                    f"no params {g_name!r}/{v_name!r} at {'/'.join(self.scope.path) or 'the top level'}; "
                    "pass the variables this wrapper's init returned (or xnorm.wrap(..., variables=...)'s)."
                )
        g, v = values.pop(g_name), values.pop(v_name)
        return self._forward(template, g, v, values, args, kwargs)

    def _forward(self, template: nn.Module, g, v, values: Dict[str, Any], args: tuple, kwargs: Dict[str, Any]):
        """The layer's output from g, v and its other params ``values``: here with w materialised
        (the fused wrapper, backends/flax/fused.py, overrides this)."""
        _, axes, keep = _resolve(self.layer, self.param_name, self._spec(), v.ndim)
        values[self.param_name] = _materialize(g, v, axes, keep, self.eps)
        return template.apply({"params": values}, *args, **kwargs)


def linen_weight(module: nn.Module, variables: Mapping[str, Any]):
    """The weight ``module`` computes with, ``w``, in Flax's storage layout, from its ``variables``.

    For a spectral-norm wrapper this is the eval-mode weight ``W / sigma`` with the stored u and v
    (no power iteration; ``variables`` needs its ``batch_stats``), see :mod:`.spectral`.
    """
    from .orthogonal import LinenOrthogonal, linen_orthogonal_weight
    from .spectral import LinenSpectralNorm, linen_spectral_weight

    if isinstance(module, LinenSpectralNorm):
        return linen_spectral_weight(module, variables)
    if isinstance(module, LinenOrthogonal):
        return linen_orthogonal_weight(module, variables)
    if not isinstance(module, LinenWeightNorm):
        raise api._not_wrapped(module)
    params = partitioning.unbox(dict(_wrapped_params(module, variables)))
    g_name, v_name = _names(module._spec(), module.param_name)
    v = jnp.asarray(params[v_name])
    _, axes, keep = _resolve(module.layer, module.param_name, module._spec(), v.ndim)
    return _materialize(jnp.asarray(params[g_name]), v, axes, keep, module.eps)


def _wrapped_params(module: LinenWeightNorm, variables: Any) -> Mapping[str, Any]:
    g_name, v_name = _names(module._spec(), module.param_name)
    params = variables.get("params") if isinstance(variables, Mapping) else None
    if not isinstance(params, Mapping) or g_name not in params or v_name not in params:
        raise MissingParameterError(
            f"the variables given have no params {g_name!r} and {v_name!r}; pass the variables of the "
            f"wrapped module itself (what its init returned), e.g. variables['params']['{module.name or 'layer'}'] "
            "wrapped as {'params': ...} for a wrapper inside a model."
        )
    return params


def _same_mapping_type(template: Any, value: Dict[str, Any]) -> Any:
    return FrozenDict(value) if isinstance(template, FrozenDict) else value


# ------------------------------------------------------------------------------------------------
# NNX
# ------------------------------------------------------------------------------------------------
class NNXLayerCopy(nnx.Module):
    """What the NNX wrappers share: the wrapped layer's ``GraphDef`` (``_xnorm_graphdef``), the name of
    the parameter they compute (``_xnorm_name``) and copies of its other top-level variables, held as
    the wrapper's own attributes under their own names (``_xnorm_others``); subclasses set all three."""

    def _layer_with(self, weight, *, share: bool) -> nnx.Module:
        """A layer built from the wrapped layer's ``GraphDef`` whose parameter holds ``weight``. With
        ``share`` its other variables are the wrapper's own (state the layer updates lands in the
        wrapper); without, copies (a plain layer of its own) and a weight carrying the metadata of the
        wrapper's tensor in the weight's layout (attribute ``_xnorm_layout``: v, or ``<name>_orig``), so a
        removed layer keeps its partitioning."""
        variables = {key: getattr(self, key) for key in self._xnorm_others}
        if not share:
            variables = {key: value.copy() for key, value in variables.items()}
            variables[self._xnorm_name] = partitioning.nnx_variable(
                getattr(self, self._xnorm_layout), weight, nnx.Param
            )
        else:
            # A fresh Param holds w: the wrapped layer's own kernel is never written (flax issue 5576).
            variables[self._xnorm_name] = nnx.Param(weight)
        return nnx.merge(self._xnorm_graphdef, nnx.State(variables))


class NNXWeightNorm(NNXLayerCopy):
    """An NNX module computing a copy of ``layer`` with its parameter ``name`` weight-normalized.

    Built by :func:`xnorm.wrap`. Its state is ``<name>_g`` and ``<name>_v`` (both ``nnx.Param``, so
    ``nnx.grad`` and ``nnx.Optimizer(..., wrt=nnx.Param)`` train them) plus the layer's other
    top-level variables under their own names (copies: the wrapped layer's state is never read again
    nor written). g has the weight's storage shape with every axis but ``dim``'s of size 1 (0-d for
    ``dim=None``); v starts as the weight and g as its norm, so the output is unchanged by wrapping.

    Each call builds a throw-away layer from the layer's ``GraphDef`` whose ``name`` variable holds
    ``w = v * (g / ||v||)`` and whose other variables are the wrapper's own, so state the layer
    updates in place (batch statistics...) lands in the wrapper.
    """

    def __init__(self, layer: nnx.Module, *, name: str, spec: WeightNorm):
        graphdef, state = nnx.split(nnx.clone(layer))
        weight = state[name].get_value()
        dim, axes, keep = _resolve(layer, name, spec, weight.ndim)
        g_name, v_name = _names(spec, name)
        self._xnorm_graphdef = graphdef
        self._xnorm_name = name
        self._xnorm_names = (g_name, v_name)
        self._xnorm_dim = dim  # canonical, normalized
        self._xnorm_axes = axes
        self._xnorm_keepdims = keep
        self._xnorm_eps = spec.eps
        self._xnorm_layer_type = type(layer)
        self._xnorm_others = tuple(key for key in state if key != name)
        self._xnorm_layout = v_name
        kernel = state[name]
        g0 = _init_g(weight, axes, keep, spec.eps)
        setattr(self, g_name, partitioning.nnx_variable(kernel, g0, nnx.Param, partitioning.kept_axes(axes, keep)))
        setattr(self, v_name, partitioning.nnx_variable(kernel, weight, nnx.Param))
        for key in self._xnorm_others:
            setattr(self, key, state[key])

    def weight(self):
        """``w``, the weight the wrapper computes with, in Flax's storage layout."""
        g_name, v_name = self._xnorm_names
        g, v = getattr(self, g_name).get_value(), getattr(self, v_name).get_value()
        return _materialize(g, v, self._xnorm_axes, self._xnorm_keepdims, self._xnorm_eps)

    def __call__(self, *args, **kwargs):
        return self._layer_with(self.weight(), share=True)(*args, **kwargs)

    def to_plain(self) -> nnx.Module:
        """A new plain layer (the wrapped layer's class) holding ``w`` as its weight and copies of the rest."""
        return self._layer_with(self.weight(), share=False)


# ------------------------------------------------------------------------------------------------
# The backend
# ------------------------------------------------------------------------------------------------
class FlaxBackend(Backend):
    """``xnorm.wrap``/``remove``/``is_wrapped`` for ``flax.linen.Module`` and ``flax.nnx.Module``.

    ``wrap(layer, spec, name=None, variables=None, fused=False, rngs=None)``:

    * linen, ``variables`` not given: returns a :class:`LinenWeightNorm` (a
      :class:`~xnorm._backends.flax.spectral.LinenSpectralNorm` for spectral norm) whose ``init``
      initialises the layer and turns its weight into the spec's tensors (and state).
    * linen, ``variables=`` the layer's existing variables (a checkpoint): returns
      ``(wrapper, wrapped_variables)``. Weight norm: g = ||W||, v = W and the other parameters
      unchanged, so ``wrapper.apply(wrapped_variables, x) == layer.apply(variables, x)``. Spectral
      norm: ``<name>_orig`` = W and ``batch_stats`` u, v drawn from ``rngs=`` (required). ``variables``
      itself is not modified.
    * NNX: returns an :class:`NNXWeightNorm` (:class:`~xnorm._backends.flax.spectral.NNXSpectralNorm`)
      built from the layer's current weight (the layer is left as it was); spectral norm draws u and v
      from ``rngs=`` (required: an ``nnx.Rngs``, a JAX key or an int seed). ``variables=`` is an
      :class:`~xnorm.errors.OptionError` here.
    * ``fused=True`` (weight norm only): the same, with the subclasses of ``fused.py``
      (``LinenFusedWeightNorm``, ``NNXFusedWeightNorm``): same variables and checkpoints, w never built
      where :func:`xnorm.spec.fused_scale_side` allows it.

    ``remove``: linen ``remove(wrapper, variables) -> (plain_layer, plain_variables)``, and for spectral
    norm ``remove(wrapper, variables, update_stats=True|False)`` (``True`` iterates first, a
    training-mode use); NNX ``remove(wrapper) -> plain_layer``, or ``remove(model)`` replacing every
    wrapper inside ``model`` (attributes, ``nnx.List``/``nnx.Dict`` items) by its plain layer and
    returning ``model`` (a spectral-norm wrapper iterates first unless it is in eval mode).

    Errors, raised before anything is changed: UnsupportedLayerError (a spec this backend does not
    implement, a linen module already bound to variables, a layer with variables outside ``params``,
    a nested weight), MissingParameterError, NonFloatingParameterError, DimError, AlreadyWrappedError
    (an xnorm wrapper, Flax's own ``WeightNorm`` or ``SpectralNorm``, or variables that already hold
    any reparametrization's names: ``<name>_g``, ``_v``, ``_orig``, ``_u``, ``_base``), NotWrappedError,
    OptionError.
    """

    name = "flax"

    def owns(self, obj: Any) -> bool:
        return isinstance(obj, (nn.Module, nnx.Module))

    def is_wrapped(self, obj: Any) -> bool:
        return isinstance(obj, _xnorm_wrappers())

    def freeze(self, obj: Any, *, affine: bool, layers: Any) -> Any:
        from . import freeze  # NNX in place; linen returns a new module (docs/freeze.md, Flax)

        return freeze.freeze(obj, affine=affine, layers=layers)

    def unfreeze(self, obj: Any) -> Any:
        from . import freeze

        return freeze.unfreeze(obj)

    def is_frozen(self, obj: Any) -> bool:
        from . import freeze

        return freeze.is_frozen(obj)

    # -- wrap -----------------------------------------------------------------------------------
    def wrap(self, layer: Any, spec: Reparametrization, *, name: Optional[str] = None, **options: Any) -> Any:
        if not isinstance(spec, (WeightNorm, SpectralNorm, Orthogonal)):
            raise UnsupportedLayerError(
                f"the flax backend does not implement {type(spec).__name__}; it implements WeightNorm, SpectralNorm "
                "and Orthogonal."
            )
        variables = options.pop("variables", _MISSING)
        fused = options.pop("fused", False)
        rngs = options.pop("rngs", _MISSING)
        if options:
            raise OptionError(
                f"unknown option(s) for the flax backend: {', '.join(sorted(options))}. The flax backend "
                "accepts variables= (linen only: the existing variables of the layer to wrap), fused= (weight "
                "norm) and rngs= (the draws of spectral norm and of the orthogonal parametrization)."
            )
        check_fused_option(fused, "flax")
        check_fused_spec(fused, spec)
        if rngs is not _MISSING and not isinstance(spec, (SpectralNorm, Orthogonal)):
            raise OptionError("rngs= seeds spectral norm's initial u and v; weight norm draws nothing. Drop it.")
        native = (nn.WeightNorm, nnx.WeightNorm, nn.SpectralNorm, nnx.SpectralNorm)
        if isinstance(layer, _xnorm_wrappers() + native):
            raise AlreadyWrappedError(
                f"{type(layer).__qualname__} is already a reparametrization wrapper; wrap the plain layer instead "
                "(xnorm.remove gives it back for an xnorm wrapper)."
            )
        if isinstance(layer, NORMALIZATION_LAYERS):
            raise UnsupportedLayerError(
                f"the flax backend cannot reparametrize a {type(layer).__module__}.{type(layer).__qualname__}: a "
                "normalization layer's scale is per feature, not a weight matrix. Wrap the Dense, Conv or Embed "
                "layers around it; to keep a BatchNorm's running statistics fixed, use xnorm.freeze."
            )
        if name is not None and not isinstance(name, str):
            raise MissingParameterError(f"name must be a parameter name (a str) or None, got {name!r}.")
        name = name or _default_name(layer)
        if isinstance(layer, nn.Module):
            return self._wrap_linen(layer, spec, name, variables, fused, rngs)
        if variables is not _MISSING:
            raise OptionError("variables= is for linen modules only; an NNX module holds its own variables. Drop it.")
        return self._wrap_nnx(layer, spec, name, fused, rngs)

    def _wrap_linen(
        self, layer: nn.Module, spec: Reparametrization, name: str, variables: Any, fused: bool, rngs: Any
    ) -> Any:
        if isinstance(layer.parent, Scope):
            raise UnsupportedLayerError(
                f"{type(layer).__name__} is bound to variables (module.bind or inside apply at the top level). "
                "Wrap the unbound module: xnorm.wrap(module.unbind()[0], variables=module.unbind()[1])."
            )
        kind, ndim, _ = _kind(layer, name)
        if variables is _MISSING:
            if rngs is not _MISSING:
                raise OptionError(
                    "rngs= is for xnorm.wrap(..., variables=...): without variables, the wrapper draws at init "
                    "(spectral norm's u and v, an orthogonal completion), from its 'params' rng. Drop rngs=."
                )
            ranks = _known_ranks(layer)
            if ranks is not None:
                if name not in ranks:
                    raise MissingParameterError(
                        f"{type(layer).__name__} has no parameter {name!r} (it has: {', '.join(sorted(ranks))})."
                    )
                check_floating(jnp.dtype(layer.param_dtype).name, what=f"{type(layer).__name__}.{name}")
                spec.resolved_dim(ranks[name], kind)
                if isinstance(spec, Orthogonal):
                    spec.resolved_map((0,) * ranks[name])  # DimError for a 1-D weight now, not at init
            else:
                spec.resolved_dim(1 << 30, kind)  # type checks now; the range once init knows the rank
            return self._make_linen(layer, spec, name, fused)

        params = variables.get("params") if isinstance(variables, Mapping) else None
        if isinstance(variables, Mapping) and not params and _known_ranks(layer) is None:
            raise _no_own_parameters(layer)  # a Dropout's variables are {}: the layer, not the mapping, is wrong
        if not isinstance(params, Mapping):
            raise MissingParameterError(
                f"variables= must be the layer's variables, a mapping with a 'params' collection "
                f"(as returned by {type(layer).__name__}.init); got {type(variables).__name__}."
            )
        held = [
            key
            for key in _reparametrized_names(name)
            if any(isinstance(collection, Mapping) and key in collection for collection in variables.values())
        ]
        if held:
            raise AlreadyWrappedError(
                f"the variables already hold {', '.join(map(repr, held))}: {name!r} is already reparametrized. "
                "Pass the plain layer's variables (xnorm.remove gives them back)."
            )
        extra = sorted(set(variables) - {"params"})
        if extra:
            raise UnsupportedLayerError(
                f"the variables hold collections besides 'params' ({', '.join(extra)}); the linen wrapper only "
                "carries 'params'. Wrap the sub-layer that owns the weight instead."
            )
        if name not in params and all(isinstance(value, Mapping) for value in params.values()):
            raise _no_own_parameters(layer, list(params))  # nn.Sequential: every parameter is a sub-module's
        if name not in params:
            raise MissingParameterError(
                f"the variables have no parameter {name!r} (they have: {', '.join(params) or 'none'}). "
                "Pass name= with one of these."
            )
        weight = partitioning.unbox(params[name])
        _check_weight(weight, f"parameter {name!r}")
        weight = jnp.asarray(weight)
        if ndim is not None and weight.ndim != ndim:
            raise UnsupportedLayerError(
                f"parameter {name!r} has {weight.ndim} axes but a {type(layer).__name__} kernel has {ndim}; "
                "these variables do not belong to this layer."
            )
        if isinstance(spec, SpectralNorm):
            from . import spectral

            spectral.matrix_axes(layer, name, spec, weight.ndim)  # DimError before anything is drawn
            key = spectral.draw_key(_required_rngs(rngs))
            wrapped_variables = spectral.wrapped_linen_variables(variables, layer, spec, name, key)
            return self._make_linen(layer, spec, name), wrapped_variables
        if isinstance(spec, Orthogonal):
            from . import orthogonal

            wrapped_variables = orthogonal.wrapped_linen_variables(
                variables, layer, spec, name, None if rngs is _MISSING else rngs
            )
            return self._make_linen(layer, spec, name), wrapped_variables
        g_name, v_name = _names(spec, name)
        _, axes, keep = _resolve(layer, name, spec, weight.ndim)
        g0 = partitioning.linen_boxed(params[name], _init_g(weight, axes, keep, spec.eps),
                                      partitioning.kept_axes(axes, keep))
        v0 = partitioning.linen_boxed(params[name], weight)
        new_params = _same_mapping_type(params, _replace_entry(params, name, {g_name: g0, v_name: v0}))
        wrapper = self._make_linen(layer, spec, name, fused)
        return wrapper, _same_mapping_type(variables, {"params": new_params})

    @staticmethod
    def _make_linen(layer: nn.Module, spec: Reparametrization, name: str, fused: bool = False) -> nn.Module:
        if isinstance(spec, SpectralNorm):
            from .spectral import LinenSpectralNorm

            cls: type = LinenSpectralNorm
            fields = dict(
                layer=layer, param_name=name, n_power_iterations=spec.n_power_iterations, eps=spec.eps, dim=spec.dim
            )
        elif isinstance(spec, Orthogonal):
            from .orthogonal import LinenOrthogonal

            cls = LinenOrthogonal
            fields = dict(
                layer=layer,
                param_name=name,
                orthogonal_map=spec.orthogonal_map,
                use_trivialization=spec.use_trivialization,
            )
        else:
            cls = _wrapper_classes(fused)[0]
            fields = dict(layer=layer, param_name=name, dim=spec.dim, eps=spec.eps)
        if layer.scope is not None and isinstance(layer.parent, nn.Module):
            # The layer was created inside a parent's compact method (or named in setup) and already
            # holds a scope at its own path, e.g. params["Dense_0"]. The wrapper takes that very scope,
            # so its variables sit where the kernel would have been; the layer itself never creates anything.
            return cls(**fields, name=layer.name, parent=layer.scope)
        return cls(**fields, name=layer.name)

    def _wrap_nnx(self, layer: nnx.Module, spec: Reparametrization, name: str, fused: bool, rngs: Any) -> nnx.Module:
        state = nnx.state(layer)
        held = [key for key in _reparametrized_names(name) if key in state]
        if held:
            raise AlreadyWrappedError(
                f"{type(layer).__name__} already has {', '.join(map(repr, held))}: {name!r} is already "
                "reparametrized. Wrap the plain layer (xnorm.remove gives it back)."
            )
        variable = getattr(layer, name, None) if name in state else None
        have = [key for key in state if isinstance(getattr(layer, str(key), None), nnx.Param)]
        if not have:
            raise _no_own_parameters(
                layer, [str(key) for key in state if not isinstance(getattr(layer, str(key), None), nnx.Variable)]
            )
        if not isinstance(variable, nnx.Param):
            raise MissingParameterError(
                f"{type(layer).__name__} has no nnx.Param {name!r} "
                f"(its parameters: {', '.join(map(str, have)) or 'none'}). "
                "Pass name= with one of these, or wrap the sub-module that owns the weight."
            )
        nested = [str(key) for key in state if not isinstance(getattr(layer, str(key), None), nnx.Variable)]
        if nested:
            raise UnsupportedLayerError(
                f"{type(layer).__name__} holds sub-modules or collections ({', '.join(nested)}); the NNX wrapper "
                "handles layers whose variables are direct attributes. Wrap the sub-module that owns the weight."
            )
        weight = variable.get_value()
        _check_weight(weight, f"{type(layer).__name__}.{name}")
        spec.resolved_dim(weight.ndim, _kind(layer, name)[0])  # DimError before anything is built
        if isinstance(spec, SpectralNorm):
            from . import spectral

            key = spectral.draw_key(_required_rngs(rngs))
            return spectral.NNXSpectralNorm(layer, name=name, spec=spec, key=key)
        if isinstance(spec, Orthogonal):
            from . import orthogonal

            return orthogonal.wrap_nnx(layer, name, spec, weight, None if rngs is _MISSING else rngs)
        return _wrapper_classes(fused)[1](layer, name=name, spec=spec)

    # -- remove ---------------------------------------------------------------------------------
    def remove(self, obj: Any, *args: Any, **options: Any) -> Any:
        if isinstance(obj, nn.Module):
            return self._remove_linen(obj, *args, **options)
        if args or options:
            raise OptionError(
                "xnorm.remove takes no extra arguments for an NNX module: call xnorm.remove(module). A spectral-norm "
                "wrapper iterates first unless it is in eval mode (module.eval())."
            )
        return self._remove_nnx(obj)

    def _remove_linen(self, module: nn.Module, *args: Any, **options: Any) -> Tuple[nn.Module, Any]:
        from .orthogonal import LinenOrthogonal
        from .orthogonal import remove_linen as remove_linen_orthogonal
        from .spectral import LinenSpectralNorm
        from .spectral import remove_linen as remove_linen_spectral

        linen_wrappers = (LinenWeightNorm, LinenSpectralNorm, LinenOrthogonal)
        if not isinstance(module, linen_wrappers):
            from .linen_model import remove_linen_model  # a whole model: its wrappers, one by one

            if len(args) != 1:
                raise OptionError(
                    "xnorm.remove on a linen model needs its variables: "
                    "plain_model, plain_variables = xnorm.remove(model, variables)."
                )
            return remove_linen_model(self, module, args[0], linen_wrappers, **options)
        if len(args) != 1:
            raise OptionError(
                "xnorm.remove on a linen wrapper needs its variables: "
                "plain_module, plain_variables = xnorm.remove(module, variables)."
            )
        variables = args[0]
        if isinstance(module, LinenOrthogonal):
            if options:
                raise OptionError(
                    f"xnorm.remove on a linen orthogonal wrapper takes no keyword options (got "
                    f"{', '.join(sorted(options))}): its base never changes, so there is no mode to choose."
                )
            return remove_linen_orthogonal(module, variables)
        if isinstance(module, LinenSpectralNorm):
            update_stats = options.pop("update_stats", None)
            if options:
                raise OptionError(f"unknown option(s) for removing spectral norm: {', '.join(sorted(options))}.")
            if not isinstance(update_stats, bool):
                raise OptionError(
                    "xnorm.remove on a linen spectral-norm wrapper needs update_stats=True (a training-mode use: "
                    "iterate once more first, as torch's removal in training mode) or update_stats=False (keep the "
                    f"current u and v, as in eval mode), got {update_stats!r}."
                )
            return remove_linen_spectral(module, variables, update_stats)
        if options:
            raise OptionError(
                f"xnorm.remove on a linen weight-norm wrapper takes no keyword options (got "
                f"{', '.join(sorted(options))}); update_stats= is for spectral norm."
            )
        params = _wrapped_params(module, variables)
        g_name, v_name = _names(module._spec(), module.param_name)
        w = partitioning.linen_reboxed(params[v_name], linen_weight(module, variables))
        plain = dict(_replace_entry({k: v for k, v in params.items() if k != v_name}, g_name, {module.param_name: w}))
        out = {key: value for key, value in variables.items() if key != "params"}
        out["params"] = _same_mapping_type(params, plain)
        return module.layer.clone(), _same_mapping_type(variables, out)

    def _remove_nnx(self, obj: nnx.Module) -> nnx.Module:
        wrappers = _xnorm_wrappers()
        if isinstance(obj, wrappers):
            return obj.to_plain()
        found = [(path, node) for path, node in nnx.iter_graph(obj) if isinstance(node, wrappers)]
        if not found:
            raise api._not_wrapped(obj)
        # Every parent is looked up and every plain layer built before the first assignment.
        plans = [(_node_at(obj, path[:-1]), path[-1], node.to_plain()) for path, node in found]
        for parent, key, plain in plans:
            if isinstance(parent, nnx.Module) and isinstance(key, str) and not hasattr(parent, "__setitem__"):
                setattr(parent, key, plain)
            else:
                parent[key] = plain
        return obj


def _xnorm_wrappers() -> Tuple[type, ...]:
    """Every wrapper class :func:`xnorm.wrap` returns for Flax (the fused ones are subclasses)."""
    from .orthogonal import LinenOrthogonal, NNXOrthogonal
    from .spectral import LinenSpectralNorm, NNXSpectralNorm

    return LinenWeightNorm, NNXWeightNorm, LinenSpectralNorm, NNXSpectralNorm, LinenOrthogonal, NNXOrthogonal


def _reparametrized_names(name: str) -> Tuple[str, ...]:
    """Every name a reparametrization of parameter ``name`` puts beside the layer's other variables
    (``kernel_g``, ``kernel_v``, ``kernel_orig``, ``kernel_u``): any of them means it is already wrapped."""
    names: Dict[str, None] = {}
    for cls in REPARAMETRIZATIONS.values():
        spec = cls()
        names.update(dict.fromkeys(spec.tensor_names(name) + spec.state_names(name)))
    return tuple(names)


def _required_rngs(rngs: Any) -> Any:
    if rngs is _MISSING:
        raise OptionError(
            "spectral norm draws its initial u and v at wrap: pass rngs= (an nnx.Rngs, as Flax layers take it, "
            "a JAX key such as jax.random.key(0), or an int seed)."
        )
    return rngs


def _wrapper_classes(fused: bool) -> Tuple[type, type]:
    """``(linen wrapper class, NNX wrapper class)``; the fused ones (fused.py) are imported only when asked for."""
    if not fused:
        return LinenWeightNorm, NNXWeightNorm
    from .fused import LinenFusedWeightNorm, NNXFusedWeightNorm

    return LinenFusedWeightNorm, NNXFusedWeightNorm


def _node_at(root: Any, path: Sequence[Any]) -> Any:
    node = root
    for key in path:
        node = getattr(node, key) if isinstance(key, str) and hasattr(node, key) else node[key]
    return node
