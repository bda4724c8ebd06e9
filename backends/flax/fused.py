"""The fused path of the Flax backend: ``xnorm.wrap(layer, fused=True)``.

The non-fused wrapper computes ``w = v * s`` with ``s = g / ||v||`` and runs the layer with ``w``.
Where ``s`` is constant along every axis of the weight but one that the layer maps linearly to one
side of its output (:func:`xnorm.spec.fused_scale_side`), ``w`` never has to exist:

==================  ==================================================================================
side                what the wrappers here compute (Flax is channels-last: channels are the last axis)
==================  ==================================================================================
``FUSED_OUTPUT``    ``layer_without_bias(x; v) * s + bias``, s per output channel (Dense/Conv dim=0,
                    ConvTranspose dim=1, Embed dim=1) or a scalar (``dim=None``/``-1``)
``FUSED_INPUT``     ``layer_without_bias(x * s; v) + bias``, s per input channel (Dense/Conv dim=1,
                    ConvTranspose dim=0); a grouped Conv's ``in/groups`` scale is tiled
                    ``feature_group_count`` times
``FUSED_ROWS``      ``Embed`` dim=0: ``lookup(ids; v) * s[ids]``, only the rows looked up are scaled
==================  ==================================================================================

Everything else materialises ``w`` exactly as the non-fused wrapper does: a ``dim`` on a kernel
(spatial) axis, a parameter other than the layer's weight (``name="bias"``), any module that is not
exactly one of ``Dense``/``Linear``, ``Conv``, ``ConvTranspose``, ``Embed`` (a subclass may change
``__call__``, so its output need not be linear in the weight), and a call whose input the wrapper
cannot find or whose channel count does not fit the scale (the layer then raises its own error).

Precision. ``s`` is computed as the non-fused path computes ``g / ||v||``: in float32 for float16
and bfloat16 weights, else in the weight's dtype. The layer runs without its bias, in the dtype it
would compute in with it (Flax promotes input, weight and bias together unless ``dtype`` is set), so
the output dtype is the one without ``fused``; the product with ``s`` and the bias add are done in
float32 at least and rounded once to that dtype (a scaled input is rounded once to the dtype the
layer promotes it to). Same math, different rounding: the results differ from the non-fused path by
float rounding only (docs/flax.md gives the measured differences). One gain in bfloat16: the bias
gradient is summed in float32 (XLA:CPU sums the cotangent of a bfloat16 bias add in bfloat16).

The wrappers are subclasses of the non-fused ones with the same parameters, names, shapes, order and
checkpoints; ``xnorm.remove`` and ``xnorm.is_wrapped`` treat them alike.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax.linen.dtypes import canonicalize_dtype

from xnorm.spec import FUSED_INPUT, FUSED_ROWS, LayerKind, WeightNorm, fused_scale_side

from . import LinenWeightNorm, NNXWeightNorm, _kind, _norm, _resolve

__all__ = ["LinenFusedWeightNorm", "NNXFusedWeightNorm", "fused_side"]

#: Modules whose ``__call__`` is ``op(x, weight) [+ bias]`` with ``op`` linear in the weight and the bias
#: added last, checked against flax 0.12's sources. Exact types only: a subclass may override ``__call__``.
_FUSABLE = (nn.Dense, nn.Conv, nn.ConvTranspose, nn.Embed, nnx.Linear, nnx.Conv, nnx.ConvTranspose, nnx.Embed)

# run(args, kwargs, drop_bias, dtype): the layer's output with v as its weight; without its bias when
# drop_bias, computing in dtype when dtype is not None.
_Runner = Callable[[tuple, Dict[str, Any], bool, Any], Any]


def fused_side(layer: Any, name: str, dim: Optional[int]) -> Optional[str]:
    """Where the fused path applies ``s`` for parameter ``name`` of ``layer`` with canonical ``dim``.

    One of :data:`~xnorm.spec.FUSED_OUTPUT`, :data:`~xnorm.spec.FUSED_INPUT`,
    :data:`~xnorm.spec.FUSED_ROWS`, or None when ``w`` is materialised (see the module docstring).
    """
    if type(layer) not in _FUSABLE:
        return None
    kind, _, _ = _kind(layer, name)
    if kind == LayerKind.GENERIC:  # name= picked another parameter: nothing says the layer is linear in it
        return None
    return fused_scale_side(kind, dim)


def _has_bias(layer: Any) -> bool:
    """Whether a layer of :data:`_FUSABLE` adds a bias (Embed has none; asking a linen Embed for a
    missing attribute would run its setup)."""
    return not isinstance(layer, (nn.Embed, nnx.Embed)) and bool(layer.use_bias)


def _scale(g, v, axes: Tuple[int, ...], keepdims: bool, eps: Optional[float]):
    """``s = g / ||v||``, in float32 for low-precision v (as the non-fused path computes it), 1-D or 0-d.

    With ``keepdims`` the norm keeps every storage axis as size 1 but one, so flattening gives the
    per-channel vector along the kept axis.
    """
    norm = _norm(v, axes, keepdims, eps)
    s = g.astype(norm.dtype) / norm
    return s.reshape(-1) if s.ndim else s


def _input_of(args: tuple, kwargs: Dict[str, Any]):
    """The layer's input (first positional argument, or ``inputs=``) and a function putting a new one back."""
    if args:
        return args[0], lambda x: ((x, *args[1:]), kwargs)
    if "inputs" in kwargs:
        return kwargs["inputs"], lambda x: (args, {**kwargs, "inputs": x})
    return None, None


def _channel_scale(s, channels: int):
    """``s`` broadcast over ``channels`` (the last axis): tiled for groups; None when it does not fit."""
    if s.ndim == 0:
        return s
    if channels % s.shape[0]:
        return None
    reps = channels // s.shape[0]
    # A grouped conv's kernel holds in/groups input channels; group k uses channels k*in/groups + j.
    return jnp.tile(s, reps) if reps > 1 else s


def _at_least_float32(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def fused_forward(
    side: str,
    g,
    v,
    axes: Tuple[int, ...],
    keepdims: bool,
    eps: Optional[float],
    args: tuple,
    kwargs: Dict[str, Any],
    *,
    run: _Runner,
    bias,
    layer_dtype,
):
    """The layer's output computed from v and ``s = g / ||v||`` on ``side``, or None to materialise w.

    ``bias`` is the layer's bias (None without one), ``layer_dtype`` its ``dtype`` attribute (None lets
    Flax promote the input's, weight's and bias's dtypes).
    """
    x, put_back = _input_of(args, kwargs)
    if x is None or not hasattr(x, "shape") or not hasattr(x, "dtype"):
        return None
    s = _scale(g, v, axes, keepdims, eps)

    if side == FUSED_ROWS:
        y = run(args, kwargs, False, None)  # first: the layer checks that the ids are integers
        rows = jnp.take(s, x, axis=0)[..., None]  # jnp.take's out-of-range rows are NaN, as the layer's
        work = _at_least_float32(y.dtype)
        return (y.astype(work) * rows.astype(work)).astype(y.dtype)

    # The bias is added here, in float32 at least, after the scale: the layer runs without it, in the
    # dtype it computes in with it (Flax promotes input, weight and bias together unless dtype is set).
    dtype = None if bias is None or layer_dtype is not None else canonicalize_dtype(x, v, bias)
    if side == FUSED_INPUT:
        if x.ndim == 0:
            return None
        scale = _channel_scale(s, x.shape[-1])
        if scale is None:
            return None
        # The scaled input keeps the dtype the layer would promote input and w to, so nothing is
        # rounded earlier than without fused.
        x_dtype = canonicalize_dtype(x, v)
        work = _at_least_float32(x_dtype)
        new_args, new_kwargs = put_back((x.astype(work) * scale.astype(work)).astype(x_dtype))
        return _add_bias(run(new_args, new_kwargs, bias is not None, dtype), None, bias)

    y = run(args, kwargs, bias is not None, dtype)  # FUSED_OUTPUT
    scale = _channel_scale(s, y.shape[-1]) if y.ndim else s
    if scale is None:
        return None  # not reached for the layers of _FUSABLE (their output channels match the kernel's)
    return _add_bias(y, scale, bias)


def _add_bias(y, scale, bias):
    """``y * scale + bias`` over the last axis (either may be None), in float32 at least, rounded once.

    Summing the bias in float32 also makes its gradient a float32 sum for bfloat16 layers.
    """
    if scale is None and bias is None:
        return y
    work = _at_least_float32(y.dtype)
    out = y.astype(work)
    if scale is not None:
        out = out * scale.astype(work)
    if bias is not None:
        out = out + jnp.reshape(bias.astype(work), (1,) * (out.ndim - 1) + (-1,))
    return out.astype(y.dtype)


# ------------------------------------------------------------------------------------------------
# linen
# ------------------------------------------------------------------------------------------------
class LinenFusedWeightNorm(LinenWeightNorm):
    """:class:`~xnorm._backends.flax.LinenWeightNorm` computing without ``w`` where the algebra allows.

    Same attributes, variables, ``init`` and errors as the non-fused wrapper (its checkpoints load in
    either); only ``apply`` differs, by float rounding (module docstring).
    """

    def _forward(self, template: nn.Module, g, v, values: Dict[str, Any], args: tuple, kwargs: Dict[str, Any]):
        dim, axes, keep = _resolve(self.layer, self.param_name, self._spec(), v.ndim)
        side = fused_side(self.layer, self.param_name, dim)
        if side is not None:
            bias = values.get("bias") if side != FUSED_ROWS and _has_bias(self.layer) else None

            def run(call_args, call_kwargs, drop_bias, dtype):
                params = dict(values)
                params[self.param_name] = v
                updates: Dict[str, Any] = {}
                if drop_bias:
                    params.pop("bias", None)
                    updates["use_bias"] = False
                if dtype is not None:
                    updates["dtype"] = dtype
                layer = self.layer.clone(**updates) if updates else template  # clone(): unbound
                return layer.apply({"params": params}, *call_args, **call_kwargs)

            out = fused_forward(
                side,
                g,
                v,
                axes,
                keep,
                self.eps,
                args,
                kwargs,
                run=run,
                bias=bias,
                layer_dtype=getattr(self.layer, "dtype", None),
            )
            if out is not None:
                return out
        return super()._forward(template, g, v, values, args, kwargs)


# ------------------------------------------------------------------------------------------------
# NNX
# ------------------------------------------------------------------------------------------------
class NNXFusedWeightNorm(NNXWeightNorm):
    """:class:`~xnorm._backends.flax.NNXWeightNorm` computing without ``w`` where the algebra allows.

    Same state (``<name>_g``, ``<name>_v`` and the layer's other variables, all under the same names),
    ``weight()``, ``to_plain()`` and ``xnorm.remove``; only ``__call__`` differs, by float rounding.
    """

    def __init__(self, layer: nnx.Module, *, name: str, spec: WeightNorm):
        super().__init__(layer, name=name, spec=spec)
        side = fused_side(layer, name, self._xnorm_dim)
        self._xnorm_fused_side = side
        self._xnorm_fused_bias = side not in (None, FUSED_ROWS) and _has_bias(layer) and "bias" in self._xnorm_others
        dtype = getattr(layer, "dtype", None)
        self._xnorm_layer_dtype = None if dtype is None else jnp.dtype(dtype)

    def __call__(self, *args, **kwargs):
        side = self._xnorm_fused_side
        if side is not None:
            g_name, v_name = self._xnorm_names
            g, v = getattr(self, g_name).get_value(), getattr(self, v_name).get_value()
            bias = self.bias.get_value() if self._xnorm_fused_bias else None

            def run(call_args, call_kwargs, drop_bias, dtype):
                layer = self._layer_with(v, share=True)
                # The throw-away layer is rebound, never the wrapper: its bias Variable stays ours.
                if drop_bias:
                    layer.bias = None
                    layer.use_bias = False
                if dtype is not None:
                    layer.dtype = dtype
                return layer(*call_args, **call_kwargs)

            out = fused_forward(
                side,
                g,
                v,
                self._xnorm_axes,
                self._xnorm_keepdims,
                self._xnorm_eps,
                args,
                kwargs,
                run=run,
                bias=bias,
                layer_dtype=self._xnorm_layer_dtype,
            )
            if out is not None:
                return out
        return super().__call__(*args, **kwargs)
