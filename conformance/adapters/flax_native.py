"""Flax's own ``WeightNorm`` and ``SpectralNorm`` (linen and NNX) run through xnorm's suite (not xnorm).

The adapters ``flax-linen-native`` and ``flax-nnx-native`` wrap the catalogue's layers the way a Flax user
would, with each wrapper's defaults except where an option of the spec has a Flax counterpart, and the
report shows, case by case, where Flax departs from xnorm's spec (``expected_failures/flax-*-native.toml``).
They build layers, move arrays and run every step exactly as ``flax-linen`` / ``flax-nnx`` do
(:mod:`xnorm.conformance.adapters.flax`); only the wrapping and the reading of tensors and state differ.

How the protocol's names map onto Flax's wrappers (``name`` is ``kernel``, or ``embedding`` for Embed):

* weight norm: ``v`` is the wrapped layer's own ``name`` parameter and ``g`` the wrapper's scale
  (linen: the param ``layer_instance/<name>/scale``; NNX: ``scales[(name,)]``, a plain array, not an
  ``nnx.Param``, so no gradient reaches it and the adapter returns none). ``dim`` becomes
  ``feature_axes`` (the storage axis holding canonical ``dim``; ``None`` for ``dim=None``/``-1``),
  ``variable_filter`` names the weight (Flax's default, ``kernel``, would leave an Embed untouched),
  ``epsilon`` is ``eps`` or Flax's 1e-12 (Flax cannot leave it out), and ``param_dtype`` the case's.
* spectral norm: ``original`` is the wrapped layer's ``name`` parameter, ``n_steps`` and ``epsilon`` the
  spec's. Flax has no ``dim``: its matrix is the storage kernel reshaped to ``(-1, last axis)``, and its
  state is one vector ``u`` over that last axis (and a ``sigma``); no ``v`` is stored. ``u`` is reported
  as the spec's ``u`` when the last storage axis holds the canonical ``dim`` (the spec's matrix then has
  the same rows), as the spec's ``v`` when the weight is 2-D and it holds the other axis, and not at all
  otherwise; ``set_state`` writes the same mapping back, so a Flax wrapper continues from the case's
  state wherever its state can hold it.
* ``remove``: Flax has none. The adapter does what a Flax user does to drop the wrapper: keeps the
  wrapped layer (``layer_instance``) with its parameters as they are (linen: the unnormalized ones;
  NNX: whatever the last call wrote into them).
* ``weight``: what the wrapper would hand its layer on an eval-mode call, computed by running a copy
  of the very wrapper around a stand-in layer that returns its weight (no state is written).

Only float32 runs: the departures are structural (initial values, iteration order, in-place writes,
missing gradients) and show in full at the dtype ported models train in; every other dtype is reported
not run, with that reason, instead of tripling the time these adapters add to CI.
"""

from __future__ import annotations

from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from xnorm.spec import Reparametrization, SpectralNorm

from .. import fine_tuning
from ..cases import LayerCase
from .flax import (
    _DTYPES,
    LinenAdapter,
    LinenHandle,
    NNXAdapter,
    NNXHandle,
    _canonical,
    _layout,
    _to_numpy,
    _weight_name,
)

__all__ = ["LinenNativeAdapter", "NNXNativeAdapter"]

_ONLY_FLOAT32 = (
    "Flax's own wrappers run at float32 only: their departures from the spec are structural and show in full "
    "there (see conformance/adapters/flax_native.py)"
)
_DTYPE_REASONS = {dtype: _ONLY_FLOAT32 for dtype in ("float64", "bfloat16", "float16")}
_REPARAMETRIZATION_REASONS = {
    "orthogonal": "Flax has orthogonal initializers only, no orthogonal parametrization",
    "freeze": fine_tuning.RUN_BY_THE_BACKEND_ADAPTER,
}


def _weight_norm_options(layer: LayerCase, spec: Reparametrization, dtype: str) -> dict:
    """Flax WeightNorm's options meaning the spec's ``dim`` and ``eps`` (``variable_filter`` apart)."""
    dim = spec.resolved_dim(len(layer.weight_shape), layer.kind)
    feature_axes = None if dim is None else _layout(layer).storage_axis(dim)
    epsilon = 1e-12 if spec.eps is None else spec.eps
    return dict(feature_axes=feature_axes, epsilon=epsilon, param_dtype=_DTYPES[dtype])


def _spectral_norm_options(spec: SpectralNorm, dtype: str) -> dict:
    return dict(n_steps=spec.n_power_iterations, epsilon=spec.eps, param_dtype=_DTYPES[dtype])


def _u_role(layer: LayerCase, spec: Reparametrization) -> Optional[str]:
    """Which vector of the spec's state Flax's ``u`` is (see the module docstring), or None."""
    if len(layer.weight_shape) < 2:
        return None
    last = _layout(layer).perm[-1]  # the canonical axis Flax's matrix keeps as its columns
    if last == spec.resolved_dim(len(layer.weight_shape), layer.kind):
        return "u"
    return "v" if len(layer.weight_shape) == 2 else None


def _g_protocol(layer: LayerCase, spec: Reparametrization, scale) -> np.ndarray:
    """Flax's scale (one value per feature of ``feature_axes``) as the protocol's ``g``."""
    dim = spec.resolved_dim(len(layer.weight_shape), layer.kind)
    scale = _to_numpy(scale)
    if dim is None:
        return scale.reshape(())
    shape = [1] * len(layer.weight_shape)
    shape[dim] = layer.weight_shape[dim]
    return scale.reshape(shape)


# ----------------------------------------------------------------------------------------------
# linen
# ----------------------------------------------------------------------------------------------
class _LinenWeightOnly(nn.Module):
    """A stand-in for the wrapped layer: declares its weight parameter and returns it."""

    weight_name: str
    shape: tuple
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, *args):
        return self.param(self.weight_name, nn.initializers.zeros_init(), self.shape, self.dtype)


class LinenNativeAdapter(LinenAdapter):
    """``flax.linen.WeightNorm`` / ``flax.linen.SpectralNorm`` (not xnorm); departures:
    ``expected_failures/flax-linen-native.toml``."""

    name = "flax-linen-native"
    dtypes = ("float32",)
    dtype_reasons = _DTYPE_REASONS
    reparametrization_reasons = _REPARAMETRIZATION_REASONS

    def wrap(self, handle: LinenHandle, spec: Reparametrization) -> LinenHandle:
        layer, name = handle.layer, _weight_name(handle.layer)
        if isinstance(spec, SpectralNorm):
            module = nn.SpectralNorm(handle.module, **_spectral_norm_options(spec, handle.dtype))
            call = {"update_stats": False}  # u stays Flax's initial draw
        else:
            module = nn.WeightNorm(
                handle.module, variable_filter={name}, **_weight_norm_options(layer, spec, handle.dtype)
            )
            call = {}
        x = self._input(layer, np.zeros(layer.input_shape), handle.dtype)
        variables = dict(module.init(jax.random.key(0), x, **call))
        # the one way into a Flax wrapper for existing weights: replace the wrapped layer's params
        variables["params"] = {**variables["params"], "layer_instance": handle.variables["params"]}
        return LinenHandle(layer, handle.dtype, module, variables, spec)

    def remove(self, handle: LinenHandle) -> LinenHandle:
        params = handle.variables["params"]["layer_instance"]
        return LinenHandle(handle.layer, handle.dtype, handle.module.layer_instance, {"params": params})

    def _protocol(self, handle: LinenHandle, params) -> Dict[str, np.ndarray]:
        if handle.spec is None:
            return super()._protocol(handle, params)
        layer, name = handle.layer, _weight_name(handle.layer)
        inner, layout = params["layer_instance"], _layout(layer)
        if isinstance(handle.spec, SpectralNorm):
            out = {"original": _canonical(layout, inner[name])}
        else:
            scale = params.get(f"layer_instance/{name}/scale")
            out = {
                "g": None if scale is None else _g_protocol(layer, handle.spec, scale),
                "v": _canonical(layout, inner[name]),
            }
        if "bias" in inner:
            out["bias"] = _to_numpy(inner["bias"])
        return out

    def _u_name(self, handle: LinenHandle) -> str:
        return f"layer_instance/{_weight_name(handle.layer)}/u"

    def state(self, handle: LinenHandle) -> Dict[str, np.ndarray]:
        role = _u_role(handle.layer, handle.spec) if isinstance(handle.spec, SpectralNorm) else None
        stats = handle.variables.get("batch_stats", {})
        if role is None or self._u_name(handle) not in stats:
            return {}
        return {role: _to_numpy(stats[self._u_name(handle)]).reshape(-1)}

    def set_state(self, handle: LinenHandle, state: Dict[str, np.ndarray]) -> LinenHandle:
        role = _u_role(handle.layer, handle.spec)
        if role in state:
            stats = dict(handle.variables["batch_stats"])
            old = stats[self._u_name(handle)]
            stats[self._u_name(handle)] = jnp.asarray(np.reshape(state[role], old.shape), dtype=old.dtype)
            handle.variables = {**handle.variables, "batch_stats": stats}
        return handle

    def weight(self, handle: LinenHandle) -> np.ndarray:
        if handle.spec is None:
            return super().weight(handle)
        layer, name = handle.layer, _weight_name(handle.layer)
        kernel = handle.variables["params"]["layer_instance"][name]
        probe = handle.module.clone(layer_instance=_LinenWeightOnly(name, kernel.shape, kernel.dtype))
        variables = {**handle.variables, "params": {**handle.variables["params"], "layer_instance": {name: kernel}}}
        call = {"update_stats": False} if isinstance(handle.spec, SpectralNorm) else {}
        return _canonical(_layout(layer), probe.apply(variables, **call))


# ----------------------------------------------------------------------------------------------
# NNX
# ----------------------------------------------------------------------------------------------
class _NNXWeightOnly(nnx.Module):
    """A stand-in for the wrapped layer: holds its weight as the same-named ``nnx.Param`` and returns it."""

    def __init__(self, weight_name: str, value) -> None:
        self.weight_name = weight_name
        setattr(self, weight_name, nnx.Param(value))

    def __call__(self, *args):
        return getattr(self, self.weight_name).get_value()


class NNXNativeAdapter(NNXAdapter):
    """``flax.nnx.WeightNorm`` / ``flax.nnx.SpectralNorm`` (not xnorm); departures:
    ``expected_failures/flax-nnx-native.toml``."""

    name = "flax-nnx-native"
    dtypes = ("float32",)
    dtype_reasons = _DTYPE_REASONS
    reparametrization_reasons = _REPARAMETRIZATION_REASONS

    def wrap(self, handle: NNXHandle, spec: Reparametrization) -> NNXHandle:
        layer, name, rngs = handle.layer, _weight_name(handle.layer), nnx.Rngs(0)
        if isinstance(spec, SpectralNorm):
            module = nnx.SpectralNorm(handle.module, rngs=rngs, **_spectral_norm_options(spec, handle.dtype))
        else:
            module = nnx.WeightNorm(
                handle.module,
                variable_filter=nnx.PathContains(name),
                rngs=rngs,
                **_weight_norm_options(layer, spec, handle.dtype),
            )
        return NNXHandle(layer, handle.dtype, module, spec)

    def remove(self, handle: NNXHandle) -> NNXHandle:
        return NNXHandle(handle.layer, handle.dtype, handle.module.layer_instance)

    def _params(self, handle: NNXHandle, state) -> Dict[str, np.ndarray]:
        if handle.spec is None:
            return super()._params(handle, state)
        layer, name = handle.layer, _weight_name(handle.layer)
        inner = state["layer_instance"]
        weight = _canonical(_layout(layer), inner[name].get_value())
        out = {"original": weight} if isinstance(handle.spec, SpectralNorm) else {"v": weight}
        if "bias" in inner:
            out["bias"] = _to_numpy(inner["bias"].get_value())
        return out

    def parameters(self, handle: NNXHandle) -> Dict[str, np.ndarray]:
        out = super().parameters(handle)
        if handle.spec is not None and not isinstance(handle.spec, SpectralNorm):
            scale = handle.module.scales[(_weight_name(handle.layer),)]
            out["g"] = _g_protocol(handle.layer, handle.spec, scale)
        return out

    def _u(self, handle: NNXHandle):
        return handle.module.batch_stats.get((_weight_name(handle.layer), "u"))

    def state(self, handle: NNXHandle) -> Dict[str, np.ndarray]:
        if not isinstance(handle.spec, SpectralNorm) or self._u(handle) is None:
            return {}
        role = _u_role(handle.layer, handle.spec)
        return {} if role is None else {role: _to_numpy(self._u(handle).get_value()).reshape(-1)}

    def set_state(self, handle: NNXHandle, state: Dict[str, np.ndarray]) -> NNXHandle:
        role = _u_role(handle.layer, handle.spec)
        if role in state:
            u = self._u(handle)
            u.set_value(jnp.asarray(np.reshape(state[role], u.get_value().shape), dtype=u.get_value().dtype))
        return handle

    def weight(self, handle: NNXHandle) -> np.ndarray:
        if handle.spec is None:
            return super().weight(handle)
        name = _weight_name(handle.layer)
        probe = nnx.clone(handle.module)
        probe.layer_instance = _NNXWeightOnly(name, getattr(handle.module.layer_instance, name).get_value())
        call = {"update_stats": False} if isinstance(handle.spec, SpectralNorm) else {}
        return _canonical(_layout(handle.layer), probe(None, **call))
