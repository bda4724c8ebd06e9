"""Conformance adapters for the Flax backend: ``flax-linen`` and ``flax-nnx`` (CPU, and GPU where present).

Both build Flax's own layers so that the plain layer computes what :mod:`xnorm.conformance.layers`
computes in torch's semantics:

* inputs and outputs move between ``(N, C, *spatial)`` and Flax's channels-last ``(N, *spatial, C)``;
* Conv: explicit symmetric padding pairs, ``strides``, ``kernel_dilation``, ``feature_group_count``;
* ConvTranspose: ``transpose_kernel=True`` (its kernel is torch's weight with the axes permuted,
  ``(*k, out, in)``) and explicit padding pairs ``(d*(k-1) - p, d*(k-1) - p + output_padding)``, which
  is exactly torch's transposed convolution. Flax's ConvTranspose has no ``feature_group_count``, so a
  grouped ConvTranspose cannot be built (see ``expected_failures/flax-*.toml``).

The canonical <-> Flax layout used here is written out from the layer kinds, independently of the
backend's own table, so a wrong ``dim`` mapping in the backend shows up as a wrong g.

Spectral norm's u and v are state: linen keeps them in the ``batch_stats`` collection of the handle's
variables, and every call passes ``update_stats`` (training-mode calls, gradients and SGD steps pass
``True``, make ``batch_stats`` mutable and store what they return; eval calls pass ``False``); NNX
keeps them as ``nnx.BatchStat``s that ``nnx.jit``/``nnx.grad`` update, and eval calls run under
``module.eval()``. The state is an argument of every compiled program, like the parameters.

The orthogonal parametrization's ``base`` is state too (linen ``batch_stats``, NNX ``nnx.BatchStat``,
canonical layout), but it never changes and its wrapper has no mode: linen calls pass it with the
parameters, read-only, and no ``update_stats``.

The fine-tuning case of ``xnorm.freeze`` (conformance/fine_tuning.py; flax_fine_tuning.py) builds its conv net in each
API (channels-last, kernels transposed from the canonical layout): linen freezes with ``xnorm.freeze``
and keeps the frozen scale and shift (and conv1) out of SGD with ``optax.multi_transform`` labels from
``frozen_labels``; NNX freezes in place and trains ``nnx.Param`` but conv1's (``_FINE_TUNED``).

Speed. Nearly all of a case's time is XLA:CPU compiling: its forward and training programs and the
small programs of ``xnorm.wrap`` and the weight check, each about 0.1-1 s, against
~0.15 s for running the whole life cycle once compiled. Every case is a new (layer, dtype, dim), so
every case needs its own programs; what the adapters do about it (see :func:`_compilation_cache`):

* JAX's persistent compilation cache stores each compiled executable under a hash of its program
  (HLO, compile options, jaxlib, XLA flags). A program met again is loaded instead of compiled: in
  this run (``dim=-1`` builds ``dim=None``'s programs; ``fused=True`` falling back to materialising w
  builds the non-fused adapter's; linen and NNX share the eager programs of ``xnorm.wrap`` and of the
  weight), and every program in a later run. Values are never part of a program (they are
  arguments), so nothing of a case's values can come back from it.
* No adapter-side conversion runs on the device: outputs, gradients and parameters come back with
  ``np.asarray`` and are converted and transposed in NumPy (exact for every dtype), which costs no
  compile.
* One ``optax.sgd`` transformation per learning rate (:func:`_sgd`): NNX's jit keys its cache on the
  optimizer's graph, which holds the transformation, so a new one per case retraced and recompiled
  the SGD step of layers whose graph is otherwise the same.
* One training program for the gradient check and the SGD steps (:func:`_training_loss`), not one
  each: they share the forward and the backward, and were 54 % of the compile time.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import os
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx, serialization

import xnorm
from xnorm._backends.flax import linen_weight
from xnorm._backends.flax.spectral import STATE_COLLECTION
from xnorm.spec import LayerKind, Orthogonal, Reparametrization, SpectralNorm, StorageLayout

from .. import fine_tuning
from ..adapter import Adapter
from ..cases import LayerCase
from ..runner import LEARNING_RATE

_DTYPES = {"float32": jnp.float32, "float64": jnp.float64, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_PLATFORMS = {"cpu": "cpu", "gpu": "gpu"}
#: the reparametrizations xnorm's Flax backend implements
FLAX_REPARAMETRIZATIONS = ("weight_norm", "spectral_norm", "orthogonal", "freeze")
#: why the fused adapters do not run the orthogonal cases
ORTHOGONAL_NOT_FUSED = "fused=True is a weight-norm path; the orthogonal parametrization has none"


class UnsupportedCase(NotImplementedError):
    """The catalogue's layer has no faithful Flax construction."""


def _layout(layer: LayerCase) -> StorageLayout:
    """Canonical (torch) -> Flax storage layout of the layer's weight, as this adapter builds it."""
    n = layer.spatial
    if layer.kind == LayerKind.LINEAR:
        return StorageLayout((1, 0))
    if layer.kind in LayerKind.CONV or layer.kind in LayerKind.CONV_TRANSPOSE:
        # Conv: (*k, in/groups, out); ConvTranspose with transpose_kernel=True: (*k, out, in). Both hold
        # canonical axis 1 then axis 0 after the kernel axes.
        return StorageLayout(tuple(range(2, n + 2)) + (1, 0))
    return StorageLayout.identity(len(layer.weight_shape))


def _weight_name(layer: LayerCase) -> str:
    return "embedding" if layer.kind == LayerKind.EMBEDDING else "kernel"


def _transpose_padding(layer: LayerCase):
    return [
        (d * (k - 1) - p, d * (k - 1) - p + op)
        for k, p, d, op in zip(layer.kernel_size, layer.padding, layer.dilation, layer.output_padding, strict=True)
    ]


def _check_buildable(layer: LayerCase) -> None:
    if layer.kind in LayerKind.CONV_TRANSPOSE and layer.groups != 1:
        raise UnsupportedCase(
            "Flax's ConvTranspose (linen and NNX) has no feature_group_count, so a grouped transposed "
            "convolution has no Flax layer to wrap."
        )


def _conv_options(layer: LayerCase) -> dict:
    """Keyword arguments of linen's and NNX's Conv for a catalogue conv layer (torch's symmetric padding)."""
    return dict(
        strides=layer.stride,
        padding=[(p, p) for p in layer.padding],
        kernel_dilation=layer.dilation,
        feature_group_count=layer.groups,
        use_bias=layer.bias,
    )


def _conv_transpose_options(layer: LayerCase) -> dict:
    """Keyword arguments of linen's and NNX's ConvTranspose reproducing torch's ConvTranspose."""
    return dict(
        strides=layer.stride,
        padding=_transpose_padding(layer),
        kernel_dilation=layer.dilation,
        transpose_kernel=True,
        use_bias=layer.bias,
    )


def linen_layer(layer: LayerCase, dtype: str) -> nn.Module:
    """The linen module a catalogue layer describes."""
    _check_buildable(layer)
    jdtype = _DTYPES[dtype]
    common = dict(dtype=jdtype, param_dtype=jdtype)
    if layer.kind == LayerKind.LINEAR:
        return nn.Dense(layer.out_channels, use_bias=layer.bias, **common)
    if layer.kind == LayerKind.EMBEDDING:
        return nn.Embed(*layer.weight_shape, **common)
    if layer.kind in LayerKind.CONV:
        return nn.Conv(layer.out_channels, layer.kernel_size, **_conv_options(layer), **common)
    return nn.ConvTranspose(layer.out_channels, layer.kernel_size, **_conv_transpose_options(layer), **common)


def nnx_layer(layer: LayerCase, dtype: str) -> nnx.Module:
    """The NNX module a catalogue layer describes (random values; the adapter overwrites them)."""
    _check_buildable(layer)
    jdtype = _DTYPES[dtype]
    # zeros: the values are overwritten, and a random initializer costs a compile per shape
    zeros = nnx.initializers.zeros
    common = dict(dtype=jdtype, param_dtype=jdtype, rngs=nnx.Rngs(0))
    if layer.kind == LayerKind.EMBEDDING:
        return nnx.Embed(*layer.weight_shape, embedding_init=zeros, **common)
    common.update(kernel_init=zeros, bias_init=zeros)
    if layer.kind == LayerKind.LINEAR:
        return nnx.Linear(layer.in_channels, layer.out_channels, use_bias=layer.bias, **common)
    if layer.kind in LayerKind.CONV:
        return nnx.Conv(layer.in_channels, layer.out_channels, layer.kernel_size, **_conv_options(layer), **common)
    return nnx.ConvTranspose(
        layer.in_channels, layer.out_channels, layer.kernel_size, **_conv_transpose_options(layer), **common
    )


def _to_numpy(array) -> np.ndarray:
    # On the host: np.asarray copies the array out as it is (bfloat16 through ml_dtypes), and every
    # float16/bfloat16/float32 value is exact in float64. An astype on the device would compile an XLA
    # program per shape and dtype for nothing the suite tests.
    return np.asarray(array).astype(np.float64)


@functools.cache
def _sgd(lr: float) -> optax.GradientTransformation:
    """The one ``optax.sgd(lr)`` of this process. A transformation is a pair of pure functions (its
    state is what ``init`` returns, kept per handle), so sharing it shares no values between cases;
    sharing it keeps NNX's jit cache, keyed on the optimizer's graph that holds it, from missing."""
    return optax.sgd(lr)


def _training_loss(y, target, grad_y, probe: float, fit: float):
    """``probe * sum(y * grad_y) + fit * mean((y - target)**2) / 2``: the gradient check (probe 1, fit 0:
    dL/dy is ``grad_y``) and the SGD step's loss (probe 0, fit 1: the squared error's) in one compiled
    program per layer instead of two; compiling is most of a case's time. Weights of 0 and 1 leave
    dL/dy exact because the catalogue's outputs are finite (0 * a finite value is 0). The gradients came out bit
    for bit as from a program of the check alone; the steps within an ulp or two of a program of the
    step alone in float32 (XLA fuses the larger program differently; docs/performance.md)."""
    return probe * jnp.sum(y * grad_y) + fit * (0.5 * jnp.mean((y - target) ** 2))


#: The learning rate the gradient check's call of the training program is compiled with (its step is
#: dropped): the runner's, so that the check and the training steps share the program.
PROBE_LEARNING_RATE = LEARNING_RATE


#: Where compiled XLA programs are kept between runs unless JAX is already told (see _compilation_cache).
CACHE_ENV = "XNORM_JAX_CACHE_DIR"


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "xnorm", "jax-compilation-cache")


def _compilation_cache() -> None:
    """Turn on JAX's persistent compilation cache for every program, small ones included.

    The cache maps a hash of a lowered program (its HLO without source locations, the compile options,
    the jax/jaxlib versions, the backend and XLA flags) to the executable XLA built from it; a hit loads
    the very executable a compile would produce, so results are bit for bit those of a compile. The
    parameter values a case runs with are arguments of the programs, never constants in them (no
    function here closes over an array), so the cache holds no case's values.

    A directory the user gave JAX (``jax_compilation_cache_dir``, e.g. ``JAX_COMPILATION_CACHE_DIR``)
    is used as it is, thresholds included. Otherwise ``$XNORM_JAX_CACHE_DIR``, or
    ``~/.cache/xnorm/jax-compilation-cache``; ``XNORM_JAX_CACHE_DIR=`` (empty) turns it off. JAX checks
    once per process, at its first compile, whether a cache is set: a process that compiled before
    the first case runs without one (slower, same results).
    """
    if jax.config.jax_compilation_cache_dir:
        return
    path = os.environ.get(CACHE_ENV, None)
    if path is None:
        path = _default_cache_dir()
    if not path:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    # The defaults skip programs compiled in under a second and tiny entries: nearly all of ours.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def _canonical(layout: StorageLayout, array) -> np.ndarray:
    """A Flax weight, v or g (storage layout; g 0-d for dim None) in the canonical layout."""
    array = _to_numpy(array)
    return array if array.ndim == 0 else layout.to_canonical(array)


def _protocol_parameters(layer: LayerCase, spec: Optional[Reparametrization], values) -> Dict[str, np.ndarray]:
    """The protocol's spec tensors by neutral name (``{g, v[, bias]}``, ``{original[, bias]}``) for a layer
    wrapped with ``spec``, or ``{weight[, bias]}`` (``spec`` None), from the layer's own parameter values."""
    layout, name = _layout(layer), _weight_name(layer)
    if spec is not None:
        out = {
            neutral: _canonical(layout, values[framework])
            for neutral, framework in zip(spec.tensors, spec.tensor_names(name), strict=True)
        }
    else:
        out = {"weight": _canonical(layout, values[name])}
    if "bias" in values:
        out["bias"] = _to_numpy(values["bias"])
    return out


def _wrap_options(spec: Reparametrization) -> dict:
    """Options of ``xnorm.wrap`` beyond the spec: spectral norm's initial draws and the orthogonal
    completion of a non-square weight need a key (the suite then sets the state to its own values, so
    which key does not matter)."""
    return {"rngs": 0} if isinstance(spec, (SpectralNorm, Orthogonal)) else {}


def _state_names(handle) -> Dict[str, str]:
    """The wrapped handle's state entries, neutral name -> framework name (empty without state)."""
    spec = handle.spec
    if spec is None:
        return {}
    return dict(zip(spec.state, spec.state_names(_weight_name(handle.layer)), strict=True))


class _FlaxAdapter(Adapter):
    backend = "flax"
    dtypes = ("float32", "float64", "bfloat16")
    dtype_reasons = {
        "float16": "XLA:CPU's float16 convolutions and reductions are not measured against the tolerance "
        "table's float16 row yet"
    }
    devices = ("cpu", "gpu")
    reparametrization_reasons: Dict[str, str] = {}

    @property
    def reparametrizations(self) -> Tuple[str, ...]:
        """Every reparametrization the Flax backend implements but those a subclass gives a not-run reason
        for (the native adapters' Flax has no orthogonal parametrization); the fused adapters list theirs."""
        return tuple(kind for kind in FLAX_REPARAMETRIZATIONS if kind not in self.reparametrization_reasons)

    def versions(self) -> Dict[str, str]:
        return {dist: importlib.metadata.version(dist) for dist in ("jax", "jaxlib", "flax", "optax")}

    def supports_device(self, device: str) -> bool:
        platform = _PLATFORMS.get(device)
        if platform is None:
            return False
        try:
            return len(jax.devices(platform)) > 0
        except RuntimeError:  # jax raises when no backend of that platform is initialised
            return False

    def setup(self, device: str) -> None:
        # x64 only widens values that have no dtype of their own (Python scalars stay weakly typed);
        # every array here is created with an explicit dtype, so float32 results are unchanged.
        jax.config.update("jax_enable_x64", True)
        # GPUs otherwise run float32 matmuls and convolutions in TF32.
        jax.config.update("jax_default_matmul_precision", "highest")
        jax.config.update("jax_default_device", jax.devices(_PLATFORMS[device])[0])
        _compilation_cache()

    # -- arrays in and out ----------------------------------------------------------------------
    @staticmethod
    def _input(layer: LayerCase, x: np.ndarray, dtype: str):
        if layer.kind == LayerKind.EMBEDDING:
            return jnp.asarray(x, dtype=jnp.int32)
        if layer.kind in LayerKind.CONV or layer.kind in LayerKind.CONV_TRANSPOSE:
            x = np.moveaxis(x, 1, -1)
        return jnp.asarray(x, dtype=_DTYPES[dtype])

    @staticmethod
    def _output_like(layer: LayerCase, array: np.ndarray, dtype: str):
        """An array shaped like the output (dL/dy, a target), canonical -> Flax layout."""
        if layer.kind in LayerKind.CONV or layer.kind in LayerKind.CONV_TRANSPOSE:
            array = np.moveaxis(array, 1, -1)
        return jnp.asarray(array, dtype=_DTYPES[dtype])

    @staticmethod
    def _output_to_canonical(layer: LayerCase, y) -> np.ndarray:
        """The layer's output as float64 NumPy in the canonical layout (moved on the host: no compile)."""
        y = _to_numpy(y)
        if layer.kind in LayerKind.CONV or layer.kind in LayerKind.CONV_TRANSPOSE:
            y = np.moveaxis(y, -1, 1)
        return y

    @staticmethod
    def _storage(layer: LayerCase, array: np.ndarray, dtype: str):
        return jnp.asarray(_layout(layer).to_storage(np.asarray(array)), dtype=_DTYPES[dtype])


# ----------------------------------------------------------------------------------------------
# linen
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LinenHandle:
    """A linen layer: its module and variables (``params``, and ``batch_stats`` with spectral norm's u, v),
    the spec it is wrapped with (None when plain) and the optimizer state of its SGD steps."""

    layer: LayerCase
    dtype: str
    module: nn.Module
    variables: Any
    spec: Optional[Reparametrization] = None
    opt_state: Any = None

    @property
    def stateful(self) -> bool:
        """Wrapped with spectral norm, whose state a training-mode use updates: every call says its mode
        (``update_stats``). The orthogonal parametrization's base is only read: no mode."""
        return isinstance(self.spec, SpectralNorm)

    @property
    def other_collections(self) -> Dict[str, Any]:
        """The collections besides ``params``: the orthogonal base (only read) or spectral norm's state
        (which a training-mode use updates)."""
        return {key: value for key, value in self.variables.items() if key != "params"}


class LinenAdapter(_FlaxAdapter):
    name = "flax-linen"

    def __init__(self) -> None:
        self._compiled: Dict[Any, Any] = {}

    def build(self, layer: LayerCase, weight: np.ndarray, bias: Optional[np.ndarray], dtype: str) -> LinenHandle:
        params = {_weight_name(layer): self._storage(layer, weight, dtype)}
        if bias is not None:
            params["bias"] = jnp.asarray(bias, dtype=_DTYPES[dtype])
        return LinenHandle(layer, dtype, linen_layer(layer, dtype), {"params": params})

    def wrap(self, handle: LinenHandle, spec: Reparametrization) -> LinenHandle:
        module, variables = xnorm.wrap(handle.module, spec, variables=handle.variables, **_wrap_options(spec))
        return LinenHandle(handle.layer, handle.dtype, module, variables, spec)

    def remove(self, handle: LinenHandle) -> LinenHandle:
        # the protocol's removal is a training-mode use
        options = {"update_stats": True} if handle.stateful else {}
        module, variables = xnorm.remove(handle.module, handle.variables, **options)
        return LinenHandle(handle.layer, handle.dtype, module, variables)

    def parameters(self, handle: LinenHandle) -> Dict[str, np.ndarray]:
        return self._protocol(handle, handle.variables["params"])

    def _protocol(self, handle: LinenHandle, params) -> Dict[str, np.ndarray]:
        """The protocol's tensors by neutral name from a tree shaped like the handle's ``params``
        (its values, or their gradients)."""
        return _protocol_parameters(handle.layer, handle.spec, params)

    def state(self, handle: LinenHandle) -> Dict[str, np.ndarray]:
        stats = handle.variables.get(STATE_COLLECTION, {})
        return {key: _to_numpy(stats[name]) for key, name in _state_names(handle).items() if name in stats}

    def set_state(self, handle: LinenHandle, state: Dict[str, np.ndarray]) -> LinenHandle:
        stats = dict(handle.variables[STATE_COLLECTION])
        for key, name in _state_names(handle).items():
            if key in state:
                stats[name] = jnp.asarray(state[key], dtype=stats[name].dtype)
        handle.variables = {**handle.variables, STATE_COLLECTION: stats}
        return handle

    def parameter_names(self, handle: LinenHandle) -> List[str]:
        return [
            "/".join(str(getattr(k, "key", k)) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(handle.variables)[0]
        ]

    def weight(self, handle: LinenHandle) -> np.ndarray:
        layout = _layout(handle.layer)
        if xnorm.is_wrapped(handle.module):
            return _canonical(layout, linen_weight(handle.module, handle.variables))
        return _canonical(layout, handle.variables["params"][_weight_name(handle.layer)])

    def _jit(self, handle: LinenHandle, what: str, make):
        # Keyed by the module's repr (its class and every attribute): handles of one case with the same
        # module (wrapped, re-loaded, plain and removed) share one compiled function.
        key = (what, repr(handle.module))
        if key not in self._compiled:
            if len(self._compiled) > 64:
                self._compiled.clear()
            self._compiled[key] = jax.jit(make(handle.module))
        return self._compiled[key]

    def forward(self, handle: LinenHandle, x: np.ndarray, *, training: bool = True) -> np.ndarray:
        x = self._input(handle.layer, x, handle.dtype)
        if not handle.stateful:
            # without state a linen layer has no mode; both paths run the same compiled function.
            y = self._jit(handle, "forward", lambda module: module.apply)(handle.variables, x)
        elif training:
            # a training-mode use: iterates and returns the new state, kept with the handle
            def make(module):
                return functools.partial(module.apply, update_stats=True, mutable=[STATE_COLLECTION])

            y, updates = self._jit(handle, "forward-training", make)(handle.variables, x)
            handle.variables = {**handle.variables, **updates}
        else:
            make = lambda module: functools.partial(module.apply, update_stats=False)  # noqa: E731
            y = self._jit(handle, "forward-eval", make)(handle.variables, x)
        return self._output_to_canonical(handle.layer, y)

    def _train(self, handle: LinenHandle, lr: float):
        """The handle's one training program (see :func:`_training_loss`): ``(params, rest, opt_state, x,
        target, grad_y, probe, fit) -> (grads, params, opt_state, state updates)``, where ``rest`` is
        :attr:`LinenHandle.other_collections`."""
        tx = _sgd(lr)

        def make(module):
            def train(params, rest, opt_state, x, target, grad_y, probe, fit):
                def loss(p):
                    variables = {**rest, "params": p}
                    if handle.stateful:
                        y, updates = module.apply(variables, x, update_stats=True, mutable=[STATE_COLLECTION])
                    else:
                        y, updates = module.apply(variables, x), {}
                    return _training_loss(y, target, grad_y, probe, fit), updates

                grads, updates = jax.grad(loss, has_aux=True)(params)
                steps, opt_state = tx.update(grads, opt_state, params)
                return grads, optax.apply_updates(params, steps), opt_state, updates

            return train

        return self._jit(handle, ("train", lr, handle.stateful), make)

    def gradients(self, handle: LinenHandle, x: np.ndarray, grad_output: np.ndarray) -> Dict[str, np.ndarray]:
        layer = handle.layer
        grad_y = self._output_like(layer, grad_output, handle.dtype)
        params = handle.variables["params"]
        x = self._input(layer, x, handle.dtype)
        grads, _, _, updates = self._train(handle, PROBE_LEARNING_RATE)(
            params, handle.other_collections, _sgd(PROBE_LEARNING_RATE).init(params), x,
            jnp.zeros_like(grad_y), grad_y, 1.0, 0.0,
        )
        handle.variables = {**handle.variables, **updates}  # a training-mode use: the state moves on
        return self._protocol(handle, grads)

    def sgd_step(self, handle: LinenHandle, x: np.ndarray, target: np.ndarray, lr: float) -> LinenHandle:
        layer = handle.layer
        if handle.opt_state is None:
            handle.opt_state = _sgd(lr).init(handle.variables["params"])
        target = self._output_like(layer, target, handle.dtype)
        x = self._input(layer, x, handle.dtype)
        _, params, opt_state, updates = self._train(handle, lr)(
            handle.variables["params"], handle.other_collections, handle.opt_state, x,
            target, jnp.zeros_like(target), 0.0, 1.0,
        )
        handle.variables = {**handle.variables, "params": params, **updates}
        handle.opt_state = opt_state
        return handle

    def fine_tune(self, run: fine_tuning.FineTuningRun) -> List[Dict[str, np.ndarray]]:
        from .flax_fine_tuning import fine_tune_linen  # it builds on this module

        return fine_tune_linen(run)

    def state_roundtrip(self, handle: LinenHandle, fresh: LinenHandle) -> LinenHandle:
        data = serialization.to_bytes(handle.variables)
        variables = serialization.from_bytes(fresh.variables, data)
        return LinenHandle(fresh.layer, fresh.dtype, fresh.module, variables, fresh.spec)


# ----------------------------------------------------------------------------------------------
# NNX
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class NNXHandle:
    """An NNX layer, the spec it is wrapped with (None when plain) and the optimizer of its SGD steps."""

    layer: LayerCase
    dtype: str
    module: nnx.Module
    spec: Optional[Reparametrization] = None
    optimizer: Any = None


@nnx.jit
def _nnx_forward(module, x):
    return module(x)


@nnx.jit
def _nnx_train(module, optimizer, x, target, grad_y, probe, fit):
    """The one training program (see :func:`_training_loss`): updates ``module`` by ``optimizer`` and
    returns the gradients."""
    grads = nnx.grad(lambda m: _training_loss(m(x), target, grad_y, probe, fit))(module)
    optimizer.update(module, grads)
    return grads


class NNXAdapter(_FlaxAdapter):
    name = "flax-nnx"

    def build(self, layer: LayerCase, weight: np.ndarray, bias: Optional[np.ndarray], dtype: str) -> NNXHandle:
        module = nnx_layer(layer, dtype)
        getattr(module, _weight_name(layer)).set_value(self._storage(layer, weight, dtype))
        if bias is not None:
            module.bias.set_value(jnp.asarray(bias, dtype=_DTYPES[dtype]))
        return NNXHandle(layer, dtype, module)

    def wrap(self, handle: NNXHandle, spec: Reparametrization) -> NNXHandle:
        return NNXHandle(handle.layer, handle.dtype, xnorm.wrap(handle.module, spec, **_wrap_options(spec)), spec)

    def remove(self, handle: NNXHandle) -> NNXHandle:
        # the module is in training mode (forward restores it), so spectral norm iterates once more
        return NNXHandle(handle.layer, handle.dtype, xnorm.remove(handle.module))

    def _params(self, handle: NNXHandle, state) -> Dict[str, np.ndarray]:
        values = {key: state[key].get_value() for key in state}
        return _protocol_parameters(handle.layer, handle.spec, values)

    def state(self, handle: NNXHandle) -> Dict[str, np.ndarray]:
        module = handle.module
        return {
            key: _to_numpy(getattr(module, name).get_value())
            for key, name in _state_names(handle).items()
            if hasattr(module, name)
        }

    def set_state(self, handle: NNXHandle, state: Dict[str, np.ndarray]) -> NNXHandle:
        for key, name in _state_names(handle).items():
            if key in state:
                variable = getattr(handle.module, name)
                variable.set_value(jnp.asarray(state[key], dtype=variable.get_value().dtype))
        return handle

    def parameters(self, handle: NNXHandle) -> Dict[str, np.ndarray]:
        return self._params(handle, nnx.state(handle.module, nnx.Param))

    def parameter_names(self, handle: NNXHandle) -> List[str]:
        return [".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(handle.module, nnx.Param))]

    def weight(self, handle: NNXHandle) -> np.ndarray:
        layout = _layout(handle.layer)
        if xnorm.is_wrapped(handle.module):
            return _canonical(layout, handle.module.weight())  # spectral norm: eval mode, the state unchanged
        return _canonical(layout, getattr(handle.module, _weight_name(handle.layer)).get_value())

    def forward(self, handle: NNXHandle, x: np.ndarray, *, training: bool = True) -> np.ndarray:
        module = handle.module
        if not training:
            module.eval()
        try:
            y = _nnx_forward(module, self._input(handle.layer, x, handle.dtype))
        finally:
            module.train()
        return self._output_to_canonical(handle.layer, y)

    def gradients(self, handle: NNXHandle, x: np.ndarray, grad_output: np.ndarray) -> Dict[str, np.ndarray]:
        # the training program on a copy, whose step is dropped; the state a training-mode use moves
        # (spectral norm's u and v) goes back to the handle's module
        layer = handle.layer
        probe = nnx.clone(handle.module)
        grad_y = self._output_like(layer, grad_output, handle.dtype)
        grads = _nnx_train(
            probe, nnx.Optimizer(probe, _sgd(PROBE_LEARNING_RATE), wrt=nnx.Param),
            self._input(layer, x, handle.dtype), jnp.zeros_like(grad_y), grad_y, 1.0, 0.0,
        )
        nnx.update(handle.module, nnx.state(probe, nnx.BatchStat))
        return self._params(handle, grads)

    def sgd_step(self, handle: NNXHandle, x: np.ndarray, target: np.ndarray, lr: float) -> NNXHandle:
        if handle.optimizer is None:
            handle.optimizer = nnx.Optimizer(handle.module, _sgd(lr), wrt=nnx.Param)
        layer = handle.layer
        target = self._output_like(layer, target, handle.dtype)
        _nnx_train(
            handle.module, handle.optimizer, self._input(layer, x, handle.dtype), target,
            jnp.zeros_like(target), 0.0, 1.0,
        )
        return handle

    def fine_tune(self, run: fine_tuning.FineTuningRun) -> List[Dict[str, np.ndarray]]:
        from .flax_fine_tuning import fine_tune_nnx  # it builds on this module

        return fine_tune_nnx(run)

    def state_roundtrip(self, handle: NNXHandle, fresh: NNXHandle) -> NNXHandle:
        data = serialization.to_bytes(nnx.to_pure_dict(nnx.state(handle.module)))
        state = nnx.state(fresh.module)
        restored = serialization.from_bytes(nnx.to_pure_dict(state), data)
        nnx.replace_by_pure_dict(state, restored)
        nnx.update(fresh.module, state)
        return fresh


# ----------------------------------------------------------------------------------------------
# fused=True: the same catalogue and tolerances, only the wrapping differs
# ----------------------------------------------------------------------------------------------
class LinenFusedAdapter(LinenAdapter):
    """``flax-linen`` with ``xnorm.wrap(..., fused=True)`` (backends/flax/fused.py)."""

    name = "flax-linen-fused"
    reparametrizations = ("weight_norm",)
    reparametrization_reasons = {
        "spectral_norm": "fused=True is a weight-norm path; spectral norm has none",
        "orthogonal": ORTHOGONAL_NOT_FUSED,
        "freeze": fine_tuning.RUN_BY_THE_BACKEND_ADAPTER,
    }

    def wrap(self, handle: LinenHandle, spec: Reparametrization) -> LinenHandle:
        module, variables = xnorm.wrap(handle.module, spec, variables=handle.variables, fused=True)
        return LinenHandle(handle.layer, handle.dtype, module, variables, spec)


class NNXFusedAdapter(NNXAdapter):
    """``flax-nnx`` with ``xnorm.wrap(..., fused=True)`` (backends/flax/fused.py)."""

    name = "flax-nnx-fused"
    reparametrizations = ("weight_norm",)
    reparametrization_reasons = {
        "spectral_norm": "fused=True is a weight-norm path; spectral norm has none",
        "orthogonal": ORTHOGONAL_NOT_FUSED,
        "freeze": fine_tuning.RUN_BY_THE_BACKEND_ADAPTER,
    }

    def wrap(self, handle: NNXHandle, spec: Reparametrization) -> NNXHandle:
        return NNXHandle(handle.layer, handle.dtype, xnorm.wrap(handle.module, spec, fused=True), spec)
